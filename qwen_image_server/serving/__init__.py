"""One request's path without HTTP: prepare, submit, wait, render; the models served, jobs, previews,
results and metrics. The API and the CLI call it; it knows nothing of FastAPI routes."""
