"""Dataset facts, run-argument loading and process-wide settings.

Every entry point imports this package (directly or through the rooms above it), so the
malloc settings of ``configs.malloc_tuning`` apply to all of them without environment variables.
"""
from configs.malloc_tuning import tune_malloc

tune_malloc()
