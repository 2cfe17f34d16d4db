"""Helpers shared by the test folders (replicas in raw formats, tiny models, small demo data, synthetic MLflow stores).

Imported as ``tests.helpers.<module>``: the repository root is on ``sys.path`` through pytest's ``pythonpath``
setting (pyproject.toml), never by hand."""
