"""locate: the recipe resolved per linear site (`recipe.resolve`) -> one SitePlan per sparse site.

Each plan carries its site's own pattern and mitigations (a mixed recipe's overrides applied), and
insert / fuse / record read only the plan. Fails early with one actionable line (NmOnnxError) for: an already-transformed model, a glob that
matches nothing (lists module paths), an unstructured pattern (reference-only), a pattern whose M
does not divide K at a site (names the site), calibration constants the recipe needs but nothing
provides (names them). Sites not selected by the recipe, or made dense by an override, are reported
as dense, with the reason.
"""

from __future__ import annotations

import onnx_ir as ir

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.sites import PACKED_KINDS, find_linear_sites, module_call
from nm_onnx.method import constant_shape, needed_constants
from nm_onnx.ops.schemas import DOMAIN
from nm_onnx.passes.common import PassReport, SitePlan
from nm_onnx.recipe import METHOD_FIELDS


def check_not_transformed(model: ir.Model) -> None:
    nm_nodes = [n.name for n in model.graph if n.domain == DOMAIN]
    keys = [k for k in model.metadata_props if k.startswith("nm_onnx.")]
    if nm_nodes or keys:
        what = f"nm_onnx node '{nm_nodes[0]}'" if nm_nodes else f"metadata '{keys[0]}'"
        raise NmOnnxError(
            f"model is already transformed by nm-onnx (it has {what}); transform the dense export instead"
        )


class LocatePass(ir.passes.InPlacePass):
    """Resolve the recipe against the model's linear sites into `self.plans` (no graph change)."""

    def __init__(self, recipe, calibration=None, report: PassReport | None = None):
        super().__init__()
        self.recipe = recipe
        self.calibration = calibration
        self.report = report if report is not None else PassReport()
        self.plans: list[SitePlan] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recipe = self.recipe
        check_not_transformed(model)
        sites = find_linear_sites(model)
        if not sites:
            raise NmOnnxError("the model has no linear sites (MatMul with a constant [K, O] weight) to sparsify")
        # a recipe names modules: a module's repeated calls (#1, #2) follow its first one (same weight, same K)
        k = {}
        for s in sites:
            k.setdefault(module_call(s.module)[0], s.k)
        settings = recipe.resolve(list(k), k)  # targets, exclude, overrides, K % M
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
        if self.calibration is not None:
            self._check_artifact_recipe()
            packed = [s.module for s in sites if s.kind in PACKED_KINDS and module_call(s.module)[0] in sparse]
            if packed:
                raise NmOnnxError(
                    f"calibration constants are fitted per Hugging Face projection (q_proj, k_proj, ...), and "
                    f"this graph packs projections into one site ('{packed[0]}', an ORT GenAI build): "
                    "calibrated recipes on packed sites are not supported yet; exclude those sites or use a "
                    "recipe without calibration"
                )
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
            constants = self.calibration.constants(base) if self.calibration is not None else {}
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
        diff = [f for f in (*METHOD_FIELDS, "overrides") if getattr(a, f) != getattr(r, f)]
        if diff:
            raise NmOnnxError(
                f"calibration artifact was made for recipe '{a.name}', which differs from '{r.name}' in "
                f"{', '.join(diff)}; calibrate with this recipe or pass the artifact directory as --recipe"
            )

    def _check_artifact_model(self, sites, selected) -> None:
        """The artifact must come from this model (same sites, same [K, O]) and cover the selected sites."""
        art = self.calibration
        shapes = art.site_shapes()
        here = {module_call(s.module)[0]: (s.k, s.o) for s in sites}
        where = f"calibration artifact '{art.path}'" if art.path else "the calibration artifact"
        source = (art.report or {}).get("model") or "another model"
        known = shapes if shapes is not None else {m: None for m in art.modules()}
        strangers = [m for m in known if m not in here]
        other = [m for m in known if m in here and known[m] is not None and tuple(known[m]) != here[m]]
        if strangers or other:
            m = (other or strangers)[0]
            detail = (f"'{m}' is [K, O] = {list(known[m])} there and {list(here[m])} here" if other
                      else f"it has site '{m}', which this model does not have")
            raise NmOnnxError(
                f"{where} was calibrated on {source}, not this model ({detail}); "
                "run `nm-onnx calibrate` on this model with this recipe"
            )
        if shapes is not None:
            uncovered = [m for m in selected if module_call(m)[0] not in shapes]
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
