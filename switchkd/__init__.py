"""switchkd: distil a large causal LM (teacher) into a small one (student)."""

__version__ = "0.1.0"
