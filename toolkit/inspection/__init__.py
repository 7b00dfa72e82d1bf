"""Read-only inspection of every tier as pandas DataFrames."""
