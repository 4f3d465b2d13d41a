"""locate: the recipe resolved per linear site (`recipe.resolve`) -> one SitePlan per sparse site.

Each plan carries its site's own pattern and mitigations (a mixed recipe's overrides applied), and
insert / fuse / record read only the plan. Fails early with one actionable line (NmOnnxError) for: an already-transformed model, a glob that
matches nothing (lists module paths), an unstructured pattern (reference-only), a pattern whose M
does not divide K at a site (names the site), calibration constants the recipe needs but nothing
provides (names them), per-projection constants (amber, wanda, learned shift) on a packed site without
`share_selection`. A packed site (ORT GenAI's qkv_proj, or `pack`'s) takes its calibration constants
from its projections' (one input-side set per group, output-side ones concatenated). Sites not selected by the recipe, or made dense by an override, are reported
as dense, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.sites import PACKED_KINDS, PACKED_MEMBERS, find_linear_sites, module_call, site_members
from nm_onnx.method import CHANNEL_FACTOR_CRITERIA, OUTPUT_CONSTANTS, constant_shape, needed_constants
from nm_onnx.ops.schemas import DOMAIN
from nm_onnx.passes.common import PassReport, SitePlan
from nm_onnx.recipe import METHOD_FIELDS, PRESETS, SHARED_SUFFIX


def check_not_transformed(model: ir.Model) -> None:
    nm_nodes = [n.name for n in model.graph if n.domain == DOMAIN]
    keys = [k for k in model.metadata_props if k.startswith("nm_onnx.")]
    if nm_nodes or keys:
        what = f"nm_onnx node '{nm_nodes[0]}'" if nm_nodes else f"metadata '{keys[0]}'"
        raise NmOnnxError(
            f"model is already transformed by nm-onnx (it has {what}); transform the dense export instead"
        )


def resolve_sites(recipe, sites) -> tuple[dict, dict[str, int]]:
    """(`recipe.resolve` over the sites' module paths, {module path: K}): a module's repeated calls
    (#1, #2) follow its first one (same weight, same K)."""
    k: dict[str, int] = {}
    for s in sites:
        k.setdefault(module_call(s.module)[0], s.k)
    return recipe.resolve(list(k), k), k  # targets, exclude, overrides, K % M


class LocatePass(ir.passes.InPlacePass):
    """Resolve the recipe against the model's linear sites into `self.plans` (no graph change)."""

    def __init__(self, recipe, calibration=None, report: PassReport | None = None):
        super().__init__()
        self.recipe = recipe
        self.calibration = calibration
        self.report = report if report is not None else PassReport()
        self.plans: list[SitePlan] = []
        self._artifact_modules: set[str] | None = None  # modules the calibration artifact has (_members)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.recipe
        check_not_transformed(model)
        sites = find_linear_sites(model)
        if not sites:
            raise NmOnnxError("the model has no linear sites (MatMul with a constant [K, O] weight) to sparsify")
        settings, _ = resolve_sites(recipe, sites)
        for st in settings.values():
            if st.is_unstructured:
                raise NmOnnxError(
                    f"recipe '{recipe.name}': pattern '{st.pattern}' at site '{st.module}' is unstructured; the ONNX "
                    "ops support N:M patterns only (unstructured sparsity is reference-only: use `nm-onnx evaluate-torch`)"
                )
        sparse = {m: st for m, st in settings.items() if not st.dense}
        needed = list(dict.fromkeys(c for st in sparse.values() for c in needed_constants(st)))
        if needed and self.calibration is None:
            raise NmOnnxError(
                f"recipe '{recipe.name}' needs calibration constants {', '.join(needed)}; "
                "pass --calibration ARTIFACT_DIR (create it with `nm-onnx calibrate`)"
            )
        for s in sites:  # a packed site's one mask serves all its projections: constants of the group
            st = sparse.get(module_call(s.module)[0])
            group_constants = st is not None and (st.criterion in CHANNEL_FACTOR_CRITERIA or st.shift == "learned")
            if s.kind in PACKED_KINDS and group_constants and not recipe.share_selection:
                what = f"criterion {st.criterion}" if st.criterion in CHANNEL_FACTOR_CRITERIA else "a learned shift"
                raise NmOnnxError(
                    f"site '{s.module}' packs {', '.join(PACKED_MEMBERS[s.kind])} into one MatMul (one mask per "
                    f"token for all of them), and {what} is per projection unless the recipe shares the selection: "
                    + (f"use recipe '{recipe.name}{SHARED_SUFFIX}'" if recipe.name in PRESETS else
                       f"set \"share_selection\": true in recipe '{recipe.name}'") + " (and calibrate with it)"
                )
        if self.calibration is not None:
            self._check_artifact_recipe()
            self._check_artifact_model(sites, [s.module for s in sites if module_call(s.module)[0] in sparse])
        self.plans = []
        for s in sites:
            base = module_call(s.module)[0]
            st = settings.get(base)
            if st is None:
                self.report.add(s, "dense", "not selected by the recipe targets/exclude")
                continue
            if st.dense:
                self.report.add(s, "dense", "pattern 'dense' set by a recipe override")
                continue
            constants = self._constants(s) if self.calibration is not None else {}
            missing = [c for c in needed_constants(st) if c not in constants]
            if missing:
                raise NmOnnxError(
                    f"calibration artifact has no {', '.join(missing)} for site '{s.module}'; "
                    "re-run `nm-onnx calibrate` with this recipe and model"
                )
            self._check_shapes(s, constants)
            self.plans.append(
                SitePlan(
                    site=s, n=st.n, m=st.m, criterion=st.criterion, shift=st.shift,
                    variance_correction=st.variance_correction, scale_shift=st.scale_shift,
                    constants=constants,
                )
            )
            self.report.add(s, "sparse", pattern=f"{st.n}:{st.m}")
        return ir.passes.PassResult(model, False)

    def _check_artifact_recipe(self) -> None:
        a, r = self.calibration.recipe, self.recipe
        diff = [f for f in (*METHOD_FIELDS, "overrides", "share_selection") if getattr(a, f) != getattr(r, f)]
        if diff:
            raise NmOnnxError(
                f"calibration artifact was made for recipe '{a.name}', which differs from '{r.name}' in "
                f"{', '.join(diff)}; calibrate with this recipe or pass the artifact directory as --recipe"
            )

    def _members(self, site) -> list[str]:
        """The artifact modules a site's constants come from: itself, or a packed site's projections
        (an ORT GenAI or `pack` site; Phi-3's own qkv_proj module is itself in the artifact)."""
        base = module_call(site.module)[0]
        if self._artifact_modules is None:  # read once per run
            self._artifact_modules = set(self.calibration.modules()) | set(self.calibration.site_shapes() or {})
        if site.kind not in PACKED_KINDS or base in self._artifact_modules:
            return [base]
        return site_members(base, site.kind)

    def _constants(self, site) -> dict:
        """The site's calibration constants; a packed site's from its projections: the input-side ones
        (static/learned shift, channel factors) are one per group (share_selection), the output-side
        ones (scale_a, scale_b) concatenated in column order."""
        members = self._members(site)
        per = [self.calibration.constants(m) for m in members]
        if len(per) == 1:
            return per[0]
        out = {}
        for name in per[0]:
            values = [c.get(name) for c in per]
            if any(v is None for v in values):
                raise NmOnnxError(f"calibration artifact has '{name}' for {members[0]} but not for all of "
                                  f"{', '.join(members)}; re-run `nm-onnx calibrate` with this recipe")
            if name in OUTPUT_CONSTANTS:
                out[name] = np.concatenate([v.reshape(-1) for v in values])
            elif all(np.array_equal(values[0], v) for v in values[1:]):
                out[name] = values[0]
            else:
                raise NmOnnxError(
                    f"site '{site.module}' packs {', '.join(members)}, and the artifact's '{name}' differs between "
                    "them: it was calibrated without one selection per group; calibrate with \"share_selection\": true"
                )
        return out

    def _check_artifact_model(self, sites, selected) -> None:
        """The artifact must come from this model (same sites, same [K, O]) and cover the selected sites."""
        art = self.calibration
        shapes = art.site_shapes()
        here = {}  # artifact module -> (K, O); a packed site's projections: (K, None), their O summed below
        packed = {}
        for s in sites:
            members = self._members(s)
            for m in members:
                here[m] = (s.k, s.o if len(members) == 1 else None)
            if len(members) > 1:
                packed[s.module] = (members, s.o)
        where = f"calibration artifact '{art.path}'" if art.path else "the calibration artifact"
        source = (art.report or {}).get("model") or "another model"
        known = shapes if shapes is not None else {m: None for m in art.modules()}
        strangers = [m for m in known if m not in here]

        def differs(m) -> bool:  # [K, O] there vs here (a packed site's projection: K only)
            there, k_o = tuple(known[m]), here[m]
            return there[0] != k_o[0] if k_o[1] is None else there != k_o

        other = [m for m in known if m in here and known[m] is not None and differs(m)]
        if shapes is not None:
            for module, (members, o) in packed.items():
                if all(m in shapes for m in members) and sum(shapes[m][1] for m in members) != o:
                    raise NmOnnxError(
                        f"{where} was calibrated on {source}, not this model (the projections of '{module}' have "
                        f"{sum(shapes[m][1] for m in members)} outputs there and {o} here); "
                        "run `nm-onnx calibrate` on this model with this recipe")
        if strangers or other:
            m = (other or strangers)[0]
            detail = (f"'{m}' is [K, O] = {list(known[m])} there and {list(here[m])} here" if other
                      else f"it has site '{m}', which this model does not have")
            raise NmOnnxError(
                f"{where} was calibrated on {source}, not this model ({detail}); "
                "run `nm-onnx calibrate` on this model with this recipe"
            )
        if shapes is not None:
            by_module = {s.module: s for s in sites}
            uncovered = [m for m in selected if not all(x in shapes for x in self._members(by_module[m]))]
            if uncovered:
                raise NmOnnxError(
                    f"{where} does not cover site '{uncovered[0]}' that recipe '{self.recipe.name}' selects "
                    f"({len(uncovered)} such site(s)); calibrate with the same targets and excludes"
                )

    @staticmethod
    def _check_shapes(site, constants) -> None:
        for name, value in constants.items():
            expect = constant_shape(name, site.k, site.o)
            if tuple(value.reshape(-1).shape) != expect:
                raise NmOnnxError(
                    f"calibration constant '{site.module}.{name}' has shape {list(value.shape)}, expected "
                    f"{list(expect)}; the artifact was calibrated on another model"
                )
