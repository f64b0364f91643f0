"""Built-in models; importing this package registers them."""

from hnvm.models import pop, ptopfreq  # noqa: F401
