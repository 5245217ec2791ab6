"""Pin the Slurm job shape on the command line, so ``--cfg hydra`` shows the numbers a job asks for.

``conf/hydra/launcher/slurm.yaml`` ties ``tasks_per_node``/``gpus_per_node``/``nodes`` to the
trainer by interpolation, which Hydra resolves only when it submits (``--cfg hydra`` prints the
hydra node without the job config, so it cannot resolve them). When the command line asks for
``hydra/launcher=slurm``, :func:`pin_slurm_shape` composes the job config once, computes the shape
with the same functions the interpolations call, and appends them as explicit
``hydra.launcher.*`` overrides. Anything it cannot decide (a swept ``trainer`` value, another
config name, an override Hydra would reject) leaves the command line as it is; the interpolations
then apply, and Hydra reports a bad override itself.
"""

from __future__ import annotations

from pathlib import Path

from xaudit import slurm_gpus_per_node, slurm_tasks_per_node

#: the repository's Hydra config directory (next to train.py / audit.py)
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
_CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
_SHAPE_KEYS = ("tasks_per_node", "gpus_per_node", "nodes")


def pin_slurm_shape(argv: list[str], config_name: str, config_dir: Path = CONF_DIR) -> list[str]:
    """``argv`` plus ``hydra.launcher.{tasks_per_node,gpus_per_node,nodes}=N`` for a Slurm launch.

    Keys the user set on the command line are kept; ``argv`` is returned unchanged when the
    launcher is not ``slurm`` or the shape cannot be known before the job runs.
    """
    args = argv[1:]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if "hydra/launcher=slurm" not in {a.replace(" ", "") for a in overrides}:
        return argv
    if any(a.split("=", 1)[0] in _CONFIG_FLAGS for a in args) or not config_dir.is_dir():
        return argv
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
        if any(p.is_sweep_override() and p.key_or_group.split(".")[0].split("/")[0] == "trainer" for p in parsed):
            return argv  # the launcher is read once per sweep: a swept trainer keeps the interpolations
        given = {p.key_or_group for p in parsed}
        job = [o for o, p in zip(overrides, parsed, strict=True)
               if not p.is_sweep_override() and not p.key_or_group.startswith("hydra")]
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            trainer = compose(config_name=config_name, overrides=job).trainer
            shape = {
                "tasks_per_node": slurm_tasks_per_node(trainer.devices, trainer.get("strategy", "auto")),
                "gpus_per_node": slurm_gpus_per_node(trainer.accelerator, trainer.devices),
                "nodes": int(trainer.get("num_nodes", 1) or 1),
            }
    except Exception:  # Hydra itself reports a bad override, with its own message
        return argv
    pinned = [f"hydra.launcher.{k}={v}" for k, v in shape.items() if f"hydra.launcher.{k}" not in given]
    # next to the other overrides: argparse takes the overrides as one run of positional arguments
    last = max(i for i, a in enumerate(argv) if i > 0 and a in overrides) + 1
    return [*argv[:last], *pinned, *argv[last:]]
