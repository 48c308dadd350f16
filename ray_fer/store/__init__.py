"""The store and the output protocol as one unit: local folders and s3:// alike (`storage`), one
writer at a time (`lease`), the fenced commit (`journal`), an output run from staging to
_SUCCESS (`output`), --skip-existing (`resume`) and sets of paths too big for one process
(`pathsets`). Imports nothing of labelling or training."""
