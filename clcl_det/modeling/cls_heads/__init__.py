"""Classification heads on RoI embeddings."""
from . import config  # noqa: F401  (the methods' config keys)
from . import text_classifier  # noqa: F401  (registration)
from . import gaussian_replay, prototype, spa  # noqa: F401  (registration)
