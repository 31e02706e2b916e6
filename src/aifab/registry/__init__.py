"""The model registry: versions per name, movable aliases, and lineage to the data and run behind each."""
