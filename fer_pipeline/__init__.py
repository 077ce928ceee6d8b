"""fer-pipeline: a re-runnable Dagster asset graph for facial emotion recognition data and models."""

__version__ = "0.1.0"
