"""spinemri: lumbar-spine degenerative disease on MRI, tracked with MLflow."""

__version__ = "0.1.0"
