"""Small shared helpers: errors, checkpoint I/O, atomic files, rank-aware logging."""
