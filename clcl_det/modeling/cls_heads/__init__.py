"""Classification heads on RoI embeddings."""
from . import text_classifier  # noqa: F401  (registration)
