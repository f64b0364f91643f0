"""Built-in models; importing this package registers them."""

from hnvm.models import hnvm, pop, ptopfreq  # noqa: F401
