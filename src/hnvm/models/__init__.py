"""Built-in models; importing this package registers them."""

import importlib
import importlib.util

# every built-in model lives in its own module and registers itself on import
BUILTIN = ("pop", "ptopfreq", "itemknn", "sknn", "bprmf", "ncf", "gru4rec", "hrnn", "caser",
           "stamp", "hnvm")

for _name in BUILTIN:
    if importlib.util.find_spec(f"hnvm.models.{_name}") is not None:
        importlib.import_module(f"hnvm.models.{_name}")
