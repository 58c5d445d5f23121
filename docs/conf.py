"""Sphinx configuration: the API reference generated from the docstrings, README's tables included.

Built by tests/test_docs.py with warnings as errors and ``nitpicky`` on, so a reference
to a name that does not exist fails the test suite.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

project = "softadapt_jax"
author = "softadapt_jax developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "none"  # signatures name jax/optax types that this site does not document
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}

# Every reference must resolve, except to the packages we build on (no network for intersphinx).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|optax|flax|nnx|np|numpy|chex|collections|typing)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Hashable|Mapping|PyTree|Mask|Layer|ParamsFilter|Variant)"),
]
html_theme = "alabaster"
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each NamedTuple field
autodoc_inherit_docstrings = False  # Flax's Module.setup docstring is not ours to document


def _canonical(target, module):
    """``module.qualname`` of the object ``target`` names, looked up as Python would, else None."""
    import importlib

    for base in ([module] if module else []) + [None]:
        path = target if base is None else f"{base}.{target}"
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            if hasattr(obj, "__qualname__") and getattr(obj, "__module__", None):
                return f"{obj.__module__}.{obj.__qualname__}"
            if not parts[cut:]:
                return getattr(obj, "__name__", None)
            break
    return None


def _resolve_short_names(app, env, node, contnode):
    """Resolves a name as the docstring's reader would import it to the object documented.

    Docstrings refer to names as users import them (``softadapt_jax.softadapt``, or
    ``Aggregator`` imported into the module); the site documents each object once, in its
    defining module. A name that Python cannot find, or that is documented nowhere, stays
    unresolved and fails the build.
    """
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    name = _canonical(target, node.get("py:module"))
    if name not in domain.objects:
        # Module-level constants have no __module__: take the one documented object of that name.
        last = target.rsplit(".", 1)[-1]
        hits = [n for n in domain.objects if n.rsplit(".", 1)[-1] == last]
        if len(hits) != 1:
            return None
        name = hits[0]
    obj = domain.objects[name]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


def setup(app):
    app.connect("missing-reference", _resolve_short_names)
