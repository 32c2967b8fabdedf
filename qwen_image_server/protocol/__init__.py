"""Wire models: what clients send and get back. Validation lives here, nowhere else."""
