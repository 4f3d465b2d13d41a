"""Names of everything the passes insert: nodes and initializers are named after their linear site.

`/model/layers.3/mlp/down_proj/MatMul` -> prefix `/model/layers.3/mlp/down_proj`, so an inserted mask
is `/model/layers.3/mlp/down_proj/NMMask` and its constant `/model/layers.3/mlp/down_proj/channel_scale`.
Dynamo exports (`node_linear_6`) use the module path: `/model.layers.0.mlp.down_proj/...`.
"""

from __future__ import annotations


def site_prefix(site) -> str:
    """Name prefix of a LinearSite (from its MatMul node name when that is a path, else the module)."""
    name = site.matmul or ""
    module, _, dup = site.module.partition("#")
    if name.startswith("/") and name.count("/") >= 2:
        base = name.rsplit("/", 1)[0]
    else:
        base = "/" + module
    return f"{base}_{dup}" if dup else base


def site_name(site, what: str) -> str:
    """`<prefix>/<what>`: the name of one inserted node, value or initializer."""
    return f"{site_prefix(site)}/{what}"
