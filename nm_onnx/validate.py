"""Parity checks of a transformed model: can the user trust the deployed number? (`tools/validate.py`)

(a) dense ONNX vs PyTorch logits on real text: max |diff| < 1e-3 and top-1 agreement 100%.
(b) layer-wise: the PyTorch reference's input of every sparsified site is captured on real text
    (forward hooks on the SparseLinear wrappers); the site's ONNX subgraph (from the input value to
    the output value that the transform recorded for it, `nm_onnx.passes.record`, cut out of the
    sparse model with its constants) runs through ORT + the op library on exactly that input. Masks
    identical (the nonzero pattern of the pruned activation: the NMMask output in the unfused form,
    the library's TokenShift + NMMask on the node's own input for a fused NMSparseMatMul), outputs
    within 1e-5 relative (max |diff| / max |ref|).
(c) teacher-forced end to end: the sparse ONNX model runs a real-text window with every site's mask
    recorded (the same library TokenShift + NMMask on the input each node actually received); the
    PyTorch reference replays the window with exactly those masks forced, and the logits are
    compared like (a). With (b) (every mask is exactly the reference's function of its input) this
    proves the deployed model computes the reference up to float rounding, with no statistics.
(d) every op kernel of the library vs its numpy reference on random inputs (masks bit for bit,
    arithmetic to float tolerance), at 2:4, 8:16, 16:32 and every N:M the sparse model's sites use.
(e) ORT vs PyTorch perplexity, a report with the paired per-window standard error: a masked model
    is chaotic (1e-6 input noise flips masks and moves a window's perplexity by a few %), so the
    verdict is PASS when the difference plus 2 s.e. is within 1%, FAIL when the difference minus 2
    s.e. exceeds 1%, and INCONCLUSIVE (not a failure) otherwise.
A model transformed with --prefill-dispatch (one If choosing a prefill and a decode form by the token
count, nm_onnx.passes.dispatch) has (b) and (c) run on each form as a plain model, and (e) on the
model itself (its windows take the prefill form).
A model with quantized linears (MatMulNBits, NMSparseMatMulNBits: `transform --quantize`) is compared
with the PyTorch reference given the same dequantized weights (`quantized_weights`), so (b), (c) and
(e) stay exact; (a) compares the float export with the float PyTorch model.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nm_onnx.errors import NmOnnxError
from nm_onnx.graph.sites import module_call, site_members

CHECKS = {
    "a": "dense ONNX vs PyTorch logits",
    "b": "layer-wise site parity (masks, outputs)",
    "c": "teacher-forced sparse logits (ORT's masks replayed in PyTorch)",
    "d": "op kernels vs numpy reference",
    "e": "sparse ORT perplexity vs PyTorch simulation",
}
LOGIT_TOL = 1e-3
SITE_REL_TOL = 1e-5
PPL_REL_TOL = 0.01
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


@dataclass
class CheckResult:
    check: str  # "a".."e"
    name: str
    status: str  # PASS | FAIL | INCONCLUSIVE
    value: float | None  # the headline number
    threshold: str
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Not a failure (INCONCLUSIVE is not a failure)."""
        return self.status != FAIL

    def line(self) -> str:
        v = "n/a" if self.value is None else f"{self.value:.3g}"
        return f"{self.status} ({self.check}) {self.name}: {v} (threshold {self.threshold})"


def _log(msg: str) -> None:
    print(f"[validate] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ (a)
def check_dense_logits(dense_path, model, windows: np.ndarray) -> CheckResult:
    import torch

    from nm_onnx.evaluation.feeds import make_feed
    from nm_onnx.runtime import make_session

    sess = make_session(dense_path)
    worst, agree, total = 0.0, 0, 0
    for w in windows:
        ids = w[None, :]
        lo = sess.run(["logits"], make_feed(sess, ids))[0]
        with torch.inference_mode():
            lt = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
        worst = max(worst, float(np.abs(lo - lt).max()))
        agree += int((lo.argmax(-1) == lt.argmax(-1)).sum())
        total += lo.shape[1]
    top1 = agree / total
    return CheckResult("a", CHECKS["a"], PASS if worst < LOGIT_TOL and agree == total else FAIL, worst,
                       f"max |diff| < {LOGIT_TOL:g}, top-1 100%",
                       {"max_abs_diff": worst, "top1_agreement": top1, "tokens": total})


# ------------------------------------------------------------------------------------------ (b)
def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output if o}


def sparse_records(sparse_proto, path) -> list[dict]:
    """The site records of a transformed model (NmOnnxError if it has none)."""
    from nm_onnx.passes.record import site_records

    records = site_records(sparse_proto)
    if not records:
        raise NmOnnxError(
            f"'{path}' carries no nm-onnx site record (metadata nm_onnx.sites): it is not a model that this "
            "version of `nm-onnx transform` wrote; transform the dense model again"
        )
    return records


def extract_site(model, x_name: str, y_name: str):
    """A standalone ModelProto computing y_name from x_name (+ constants) out of `model`, or an error."""
    import onnx
    from onnx import helper

    g = model.graph
    prod = _producers(g)
    inits = {t.name: t for t in g.initializer}
    nodes, seen, used_inits = [], set(), set()
    stack = [y_name]
    while stack:
        v = stack.pop()
        if v == x_name or v in seen or not v:
            continue
        seen.add(v)
        if v in inits:
            used_inits.add(v)
            continue
        n = prod.get(v)
        if n is None:
            raise NmOnnxError(
                f"value {v!r} feeding {y_name!r} is neither produced between the site's input {x_name!r} "
                "and its output nor a constant: the site subgraph is not self-contained"
            )
        if id(n) not in {id(m) for m in nodes}:
            nodes.append(n)
            stack.extend(n.input)
    order = {id(n): i for i, n in enumerate(g.node)}
    nodes.sort(key=lambda n: order[id(n)])
    if not any(x_name in n.input for n in nodes):
        raise NmOnnxError(f"the site output {y_name!r} does not depend on its input {x_name!r}")
    elem = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "site", [helper.make_tensor_value_info(x_name, elem, None)],
        [helper.make_tensor_value_info(y_name, elem, None)],
        [inits[i] for i in sorted(used_inits)],
    )
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def _ort(model_proto, extra_outputs=()):
    """Session of a small in-memory model with the op library; extra intermediate values exposed."""
    import onnx
    import onnxruntime as ort

    from nm_onnx import ops

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    for name in extra_outputs:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if ops.library_available():
        ops.register_library(so)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _channel_scale_input(node) -> str | None:
    """The name of a fused node's channel_scale input (its place differs per op), or None."""
    from nm_onnx.ops.schemas import SCHEMAS

    at = SCHEMAS[node.op_type].input_names.index("channel_scale")
    return node.input[at] if len(node.input) > at and node.input[at] else None


def library_mask(node, x_node: np.ndarray, constants: dict) -> np.ndarray:
    """Keep pattern a fused NMSparseMatMul node chooses for its input: the library's TokenShift + NMMask."""
    from nm_onnx.ops.graphs import op_model

    a = _attrs(node)
    xin = x_node
    shift = a.get("shift", "none")
    if shift != "none":
        ts = _ort(op_model("TokenShift", ["X"], ["Xc", "eta"], mode=shift))
        xin = ts.run(["Xc"], {"X": xin})[0]
    cs = _channel_scale_input(node)
    feeds = {"X": xin}
    if cs is not None:
        if cs not in constants:
            raise NmOnnxError(f"channel_scale {cs!r} of {node.name} is not a constant")
        feeds["channel_scale"] = np.asarray(constants[cs], dtype=np.float32)
    mm = _ort(op_model("NMMask", ["X", "channel_scale"] if cs else ["X"], ["Y"], n=a["n"], m=a["m"],
                       criterion="magnitude"))
    return mm.run(["Y"], feeds)[0] != 0


def _sparse_node(nodes):
    from nm_onnx.ops.schemas import DOMAIN, NM_MASK, SPARSE_MATMULS

    nm = [n for n in nodes if n.domain == DOMAIN and n.op_type in (NM_MASK, *SPARSE_MATMULS)]
    if len(nm) != 1:
        raise NmOnnxError(f"site subgraph has {len(nm)} NMMask/NMSparseMatMul nodes, expected 1")
    return nm[0]


def onnx_site_mask(site_model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(site output, nonzero pattern of the pruned activation) of a site subgraph on input x."""
    from onnx import numpy_helper

    node = _sparse_node(site_model.graph.node)
    y_name = site_model.graph.output[0].name
    x_node = node.input[0]
    extra = [v for v in {x_node} if v != site_model.graph.input[0].name]
    if node.op_type == "NMMask":
        extra.append(node.output[0])
    sess = _ort(site_model, extra)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {site_model.graph.input[0].name: x})))
    y = res[y_name]
    if node.op_type == "NMMask":
        return y, res[node.output[0]] != 0
    consts = {t.name: numpy_helper.to_array(t) for t in site_model.graph.initializer}
    return y, library_mask(node, res.get(x_node, x), consts)


def torch_site_reference(module, x):
    """(output, nonzero pattern of the pruned activation) of a SparseLinear on input x (torch)."""
    import torch

    from nm_onnx.reference import functional as F

    r = module.setting  # the site's own pattern and mitigations (a mixed recipe's overrides applied)
    with torch.no_grad():
        y = module(x)
        if r.shift == "median":
            eta = F.token_median(x)
        elif r.shift == "mean":
            eta = F.token_mean(x)
        elif r.shift == "static":
            eta = module.static_shift.reshape(())
        elif r.shift == "learned":
            eta = module.learned_shift
        else:
            eta = None
        xc = x if eta is None else x - eta
        mask = F.nm_mask(F.selection_scores(xc, r.criterion, module.channel_scale), module.n, module.m)
        nz = mask & (xc != 0)
    return y.float().numpy(), nz.numpy()


def _capture_inputs(model, wrappers, window: np.ndarray) -> dict[str, list]:
    """{module path: [input of each call]} of the sparsified PyTorch model on one window."""
    import torch

    captured: dict[str, list] = {p: [] for p in wrappers}
    hooks = [w.register_forward_hook(lambda mod, inp, out, p=p: captured[p].append(inp[0].detach().clone()))
             for p, w in wrappers.items()]
    try:
        with torch.inference_mode():
            model(input_ids=torch.from_numpy(window[None, :]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _members(rec) -> tuple[list[str], int]:
    """(the PyTorch modules a site record computes, which call of them): one module, or a packed ORT GenAI
    site's projections in column order (its output is theirs concatenated; they read the same input)."""
    base, occ = module_call(rec["module"])
    return site_members(base, rec.get("kind", "")), occ


def _coverage(records, wrappers) -> list[str]:
    """Failures: sites the ONNX model sparsifies that PyTorch does not, and the other way round."""
    bases = {m for r in records for m in _members(r)[0]}
    out = [f"{r['module']}: the sparse ONNX model sparsifies it, the recipe does not target it in PyTorch"
           for r in records if not all(m in wrappers for m in _members(r)[0])]
    out += [f"{p}: the recipe sparsifies it in PyTorch, the sparse ONNX model has no such site"
            for p in wrappers if p not in bases]
    return out


def _read_external(proto, base: Path) -> None:
    """Fill the external tensors of `proto` from the files under `base` (onnx.load refuses a data file
    with several hard links, which is what the dispatch forms' temp dirs make of the transform output's)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    root = base.resolve()
    for t in proto.graph.initializer:
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            path = (base / info.location).resolve()
            if root not in path.parents:
                raise NmOnnxError(f"tensor {t.name!r} names external data '{info.location}' outside the model's "
                                  f"folder '{base}'; keep a model's data files beside it")
            with open(path, "rb") as f:
                f.seek(info.offset or 0)
                t.raw_data = f.read(info.length) if info.length else f.read()
            del t.external_data[:]
            t.data_location = t.DEFAULT


def check_layerwise(sparse_path, model, window: np.ndarray, max_sites: int | None = None) -> CheckResult:
    import onnx

    from nm_onnx.graph.load import model_file, read_proto
    from nm_onnx.reference import sparse_modules

    records = sparse_records(read_proto(sparse_path, check_external=False), sparse_path)
    wrappers = sparse_modules(model)
    captured = _capture_inputs(model, wrappers, window)
    src = model_file(sparse_path)
    sparse = onnx.load(str(src), load_external_data=False)
    _read_external(sparse, src.parent)
    failures = _coverage(records, wrappers)
    worst_rel, mask_fail, per_site = 0.0, 0, []
    for rec in records[:max_sites] if max_sites else records:
        members, occ = _members(rec)
        calls = captured.get(members[0], [])
        if occ >= len(calls) or not all(m in wrappers for m in members):
            if members[0] in wrappers:
                failures.append(f"{rec['module']}: PyTorch called the module {len(calls)} time(s)")
            per_site.append({"site": rec["module"], "error": "no PyTorch input"})
            continue
        sub = extract_site(sparse, rec["input"], rec["output"])
        x = calls[occ]
        refs = [torch_site_reference(wrappers[m], x) for m in members]  # a packed site: same x, one mask
        y_t, nz_t = np.concatenate([y for y, _ in refs], axis=-1), refs[0][1]
        if any((nz != nz_t).any() for _, nz in refs[1:]):
            failures.append(f"{rec['module']}: its projections choose different masks in PyTorch (per-projection "
                            "channel factors), which one packed site cannot express")
        y_o, nz_o = onnx_site_mask(sub, x.float().numpy())
        rel = float(np.abs(y_o - y_t).max() / max(float(np.abs(y_t).max()), 1e-30))
        diff = int((nz_o != nz_t).sum())
        worst_rel = max(worst_rel, rel)
        if diff:
            mask_fail += 1
        if diff or not rel <= SITE_REL_TOL:
            failures.append(f"{rec['module']}: {diff} mask entries differ, relative error {rel:.3g}")
        per_site.append({"site": rec["module"], "rel_error": rel, "mask_mismatches": diff})
    return CheckResult("b", CHECKS["b"], FAIL if failures else PASS, worst_rel,
                       f"masks identical, relative error <= {SITE_REL_TOL:g}",
                       {"sites": len(per_site), "sites_with_mask_mismatch": mask_fail,
                        "failures": failures[:20], "per_site": per_site})


# ------------------------------------------------------------------------- quantized weights
def quantized_weights(sparse_path) -> dict[str, np.ndarray]:
    """{module path: W [O, K] float32} of every quantized linear of a transformed model: the dequantized
    weights it computes with (NMSparseMatMulNBits sites from their K-major inputs, dense or unfused
    MatMulNBits sites from theirs). {} for a model without quantized weights."""
    from nm_onnx.graph.constants import load_weight
    from nm_onnx.graph.load import load_model, model_file
    from nm_onnx.graph.sites import find_linear_sites
    from nm_onnx.ops import nbits
    from nm_onnx.ops.schemas import NM_SPARSE_MATMUL_NBITS
    from nm_onnx.passes.record import site_records

    model = load_model(model_file(sparse_path))
    out = {module_call(s.module)[0]: np.array(load_weight(model, s), dtype=np.float32)
           for s in find_linear_sites(model) if s.quant is not None}
    nodes = {n.name: n for n in model.graph if n.name}
    for r in site_records(model):
        node = next((nodes[x] for x in r["nodes"] if x in nodes and nodes[x].op_type == NM_SPARSE_MATMUL_NBITS), None)
        if node is None:
            continue
        a, ins = node.attributes, list(node.inputs) + [None] * 3
        km = nbits.KMajor(b=ins[1].const_value.numpy(), scales=ins[2].const_value.numpy(),
                          zero_points=None if ins[3] is None else ins[3].const_value.numpy(), k=r["k"], o=r["o"],
                          bits=a.get_int("bits", 4), block_size=a.get_int("block_size"))
        out[module_call(r["module"])[0]] = np.ascontiguousarray(km.dequantize().T)
    return out


def simulate_weights(model, weights: dict[str, np.ndarray]) -> dict:
    """Give the PyTorch model's linears the deployed (dequantized) weights; returns what restore_weights
    needs. A tied lm_head gets its own parameter (the embedding keeps the float weights it looks up)."""
    import torch

    saved = {}
    for path, w in _split_packed(model, weights).items():
        mod = model.get_submodule(path)
        if tuple(mod.weight.shape) != w.shape:
            raise NmOnnxError(f"site '{path}': the sparse model's weight is {list(w.shape)}, the PyTorch module's "
                              f"{list(mod.weight.shape)}; validate the model this export was made from")
        saved[path] = mod.weight
        mod.weight = torch.nn.Parameter(torch.from_numpy(w).to(mod.weight.dtype), requires_grad=False)
    return saved


def _split_packed(model, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed ORT GenAI weight (qkv_proj, gate_up_proj: no such PyTorch module) split by rows into its
    projections, in column order; other weights as they are."""
    from nm_onnx.graph.sites import PACKED_KINDS, PACKED_MEMBERS

    out = {}
    for path, w in weights.items():
        leaf = path.rsplit(".", 1)[-1]
        kind = next((k for k in PACKED_KINDS if leaf == f"{k}_proj"), None)
        try:
            model.get_submodule(path)
            kind = None
        except AttributeError:
            pass
        if kind is None:
            out[path] = w
            continue
        start = 0
        for m in site_members(path, kind):
            rows = model.get_submodule(m).weight.shape[0]
            out[m] = np.ascontiguousarray(w[start:start + rows])
            start += rows
        if start != w.shape[0]:
            raise NmOnnxError(f"site '{path}': the packed weight has {w.shape[0]} output rows, its projections "
                              f"{', '.join(PACKED_MEMBERS[kind])} have {start}; validate the model it was built from")
    return out


def restore_weights(model, saved: dict) -> None:
    for path, weight in saved.items():
        model.get_submodule(path).weight = weight


# ------------------------------------------------------------------------------------------ (c)
def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (same filesystem) or a copy: ORT refuses external data reached through a symlink
    that leaves the model's folder ("External data path escapes model directory")."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _model_variant(src: Path, proto, prefix: str = "nm-onnx-validate-") -> tempfile.TemporaryDirectory:
    """A temp dir holding `proto` (a variant of the model file `src`) as model.onnx beside src's weights
    (hard-linked when the temp dir is on their filesystem, copied otherwise) and its genai_config.json."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from nm_onnx import genai

    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    if genai.is_genai_dir(src.parent):  # its config gives the feeds the KV head size
        shutil.copy2(src.parent / genai.CONFIG, Path(tmp.name) / genai.CONFIG)
    for loc in {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}:
        _link_or_copy((src.parent / loc).resolve(), Path(tmp.name) / loc)
    onnx.save(proto, str(Path(tmp.name) / "model.onnx"))
    return tmp


def _exposing_session(sparse_path, names: list[str]):
    """(session, temp dir) of the sparse model with extra graph outputs `names`."""
    import onnx

    from nm_onnx.graph.load import model_file, read_proto
    from nm_onnx.runtime import make_session

    src = model_file(sparse_path)
    proto = read_proto(src)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
            have.add(name)
    tmp = _model_variant(src, proto)
    return make_session(Path(tmp.name) / "model.onnx"), tmp


def dispatch_forms(sparse_path) -> tuple[dict[str, Path], list]:
    """({form: model path}, temp dirs to clean up): for a model transformed with --prefill-dispatch its
    prefill and decode forms, each a plain model (nm_onnx.passes.dispatch.select_form); else {"": path}."""
    import onnx_ir as ir

    from nm_onnx.graph.load import model_file, read_proto
    from nm_onnx.passes.dispatch import FORMS, dispatch_info, select_form

    src = model_file(sparse_path)
    proto = read_proto(src, check_external=False)
    if dispatch_info(proto) is None:
        return {"": src}, []
    forms, tmps = {}, []
    for form in FORMS:
        model = ir.serde.deserialize_model(proto)  # external weights stay references: nothing is read
        select_form(model, form)
        tmp = _model_variant(src, ir.serde.serialize_model(model), prefix=f"nm-onnx-{form}-form-")
        tmps.append(tmp)
        forms[form] = Path(tmp.name) / "model.onnx"
    return forms, tmps


def ort_masks(sparse_path, window: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
    """(logits, {site module: keep pattern}, records) of the sparse ONNX model on one window.

    The masks are the ones the model chose: the NMMask output's nonzero pattern (unfused), or the
    library's TokenShift + NMMask on the input the fused NMSparseMatMul node received.
    """
    from onnx import numpy_helper

    from nm_onnx.evaluation.feeds import make_feed
    from nm_onnx.graph.load import model_file, read_proto

    proto = read_proto(sparse_path, check_external=False)
    records = sparse_records(proto, sparse_path)
    by_name = {n.name: n for n in proto.graph.node}
    nodes = {r["module"]: _sparse_node([by_name[x] for x in r["nodes"] if x in by_name]) for r in records}
    want = sorted({n.output[0] if n.op_type == "NMMask" else n.input[0] for n in nodes.values()})
    sess, tmp = _exposing_session(model_file(sparse_path), ["logits", *want])
    try:
        outs = [o.name for o in sess.get_outputs()]
        res = dict(zip(outs, sess.run(None, make_feed(sess, window[None, :]))))
    finally:
        del sess
        tmp.cleanup()
    inits = {t.name: t for t in proto.graph.initializer}
    masks = {}
    for module, node in nodes.items():
        if node.op_type == "NMMask":
            masks[module] = res[node.output[0]] != 0
        else:
            cs = _channel_scale_input(node)
            consts = {cs: numpy_helper.to_array(inits[cs])} if cs in inits else {}
            masks[module] = library_mask(node, res[node.input[0]], consts)
    return res["logits"], masks, records


def check_teacher_forced(sparse_path, model, window: np.ndarray) -> CheckResult:
    """(c): ORT's masks replayed in the PyTorch reference; logits compared like (a)."""
    import torch

    from nm_onnx.reference import sparse_modules

    logits_o, masks, records = ort_masks(sparse_path, window)
    wrappers = sparse_modules(model)
    failures = _coverage(records, wrappers)
    # How many entries the reference would choose differently on its own inputs (the chaos (c) avoids).
    own = _capture_inputs(model, wrappers, window)
    flips, entries = 0, 0
    for rec in records:
        members, occ = _members(rec)
        base = members[0]
        if base in wrappers and occ < len(own.get(base, [])):
            _, nz = torch_site_reference(wrappers[base], own[base][occ])
            flips += int((nz != masks[rec["module"]]).sum())
            entries += nz.size
    for rec in records:
        for m in _members(rec)[0]:  # a packed site's one mask is every projection's
            if m in wrappers:
                wrappers[m].forced_masks.append(torch.from_numpy(masks[rec["module"]]))
    try:
        with torch.inference_mode():
            logits_t = model(input_ids=torch.from_numpy(window[None, :]), use_cache=False).logits.float().numpy()
        left = {p: len(w.forced_masks) for p, w in wrappers.items() if w.forced_masks}
    finally:
        for w in wrappers.values():
            w.forced_masks.clear()
    if left:
        failures.append(f"{len(left)} module(s) were not called as often as the ONNX model has sites "
                        f"(e.g. {next(iter(left))})")
    worst = float(np.abs(logits_o - logits_t).max())
    top1 = float((logits_o.argmax(-1) == logits_t.argmax(-1)).mean())
    ok = not failures and worst < LOGIT_TOL and top1 == 1.0
    return CheckResult("c", CHECKS["c"], PASS if ok else FAIL, worst, f"max |diff| < {LOGIT_TOL:g}, top-1 100%",
                       {"max_abs_diff": worst, "top1_agreement": top1, "tokens": int(window.shape[0]),
                        "sites": len(records), "failures": failures[:20],
                        "reference_would_flip": flips, "mask_entries": entries})


# ------------------------------------------------------------------------------------------ (e)
def perplexity_verdict(rel: float, se: float | None, tol: float = PPL_REL_TOL) -> str:
    """PASS when |diff| + 2 s.e. <= tol, FAIL when |diff| - 2 s.e. > tol, else INCONCLUSIVE."""
    if se is None:
        return FAIL if rel > tol else INCONCLUSIVE
    if rel + 2 * se <= tol:
        return PASS
    if rel - 2 * se > tol:
        return FAIL
    return INCONCLUSIVE


def check_perplexity(sparse_path, model, windows: np.ndarray) -> CheckResult:
    """ORT vs PyTorch perplexity on the same windows, with the paired per-window noise (1 s.e.).

    A masked model is chaotic: float noise of 1e-4 upstream flips a few mask entries, each flip swaps
    which weight rows a token reads, and the change cascades. On SmolLM2-135M at 50% a 1e-6 input
    perturbation moves one window's perplexity by ~3%, so N windows resolve a difference only to the
    standard error of the mean paired difference of the per-window NLLs; the verdict says whether
    they did (perplexity_verdict).
    """
    from nm_onnx.evaluation.perplexity import perplexity_onnx
    from nm_onnx.reference.perplexity import nll_torch
    from nm_onnx.runtime import make_session

    ort_r = perplexity_onnx(make_session(sparse_path), windows, desc="sparse ORT")
    torch_r = nll_torch(model, windows, progress=True, desc="torch simulation")
    rel = abs(ort_r.perplexity / torch_r.perplexity - 1)
    diff = np.asarray(ort_r.window_nll) - np.asarray(torch_r.window_nll)
    # exp(mean diff) - 1 ~ mean diff for small differences: the s.e. of the mean is the relative s.e.
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
    status = perplexity_verdict(rel, se)
    details = {"ort": ort_r.perplexity, "torch": torch_r.perplexity, "windows": int(windows.shape[0]),
               "seqlen": int(windows.shape[1]), "rel_se": se,
               "window_rel_diff": [float(np.expm1(d)) for d in diff]}
    if status == INCONCLUSIVE:
        details["note"] = (
            f"paired per-window noise {'n/a' if se is None else f'{100 * se:.2f}%'} (1 s.e.) does not resolve "
            f"{100 * PPL_REL_TOL:g}% with {len(diff)} window(s); (c) is the exact check, raise --limit to resolve this one"
        )
    return CheckResult("e", CHECKS["e"], status, rel,
                       f"relative difference <= {PPL_REL_TOL:g} (+-2 s.e.)", details)


# ------------------------------------------------------------------------------------------ (d)
def check_kernels(seed: int = 0, patterns=()) -> CheckResult:
    """(d) on 2:4, 8:16, 16:32 plus the (n, m) `patterns` a sparse model uses (its site records)."""
    from nm_onnx import ops
    from nm_onnx.ops import reference as ref
    from nm_onnx.ops.graphs import op_model
    from nm_onnx.ops.testing import random_values

    ops.library_path()  # clear error when the library is missing
    rng = np.random.default_rng(seed)
    cases, failures, worst = 0, [], 0.0
    extra = [tuple(p) for p in patterns]
    mask_patterns = list(dict.fromkeys([(2, 4), (8, 16), (16, 32), *extra]))
    matmul_patterns = list(dict.fromkeys([(2, 4), (8, 16), *extra]))

    def run(model, feeds, outs):
        return _ort(model).run(outs, feeds)

    for kind in ("normal", "ties", "special"):
        x = random_values(rng, (3, 5, 64), kind)
        for mode in ("median", "mean"):
            xc, eta = run(op_model("TokenShift", ["X"], ["Xc", "eta"], mode=mode), {"X": x}, ["Xc", "eta"])
            rxc, reta = ref.token_shift(x, mode)
            cases += 1
            if not (_same_bits(eta, reta) and _close(xc, rxc)):
                failures.append(f"TokenShift mode={mode} on {kind} inputs")
        for n, m in mask_patterns:
            xk = x if 64 % m == 0 else random_values(rng, (3, 5, 2 * m), kind)
            for crit in ("magnitude", "clact"):
                for with_cs in (False, True):
                    cs = rng.random(xk.shape[-1]).astype(np.float32) + 0.5 if with_cs else None
                    names = ["X", "channel_scale"] if with_cs else ["X"]
                    feeds = {"X": xk, **({"channel_scale": cs} if with_cs else {})}
                    y = run(op_model("NMMask", names, ["Y"], n=n, m=m, criterion=crit), feeds, ["Y"])[0]
                    cases += 1
                    if not _same_bits(y, ref.nm_mask(xk, n, m, crit, cs)):
                        failures.append(f"NMMask {n}:{m} {crit} cs={with_cs} on {kind} inputs")
    for shift in ("none", "median", "mean"):
        for vc in (0, 1):
            for n, m in matmul_patterns:
                k = 64 if 64 % m == 0 else 2 * m
                x = random_values(rng, (2, 7, k), "normal")
                b = random_values(rng, (k, 24), "normal")
                cs = rng.random(k).astype(np.float32) + 0.5
                sb = b.sum(0).astype(np.float32)
                bias = random_values(rng, (24,), "normal")
                names = ["X", "B", "channel_scale", "shift_bias", "bias"]
                y = run(op_model("NMSparseMatMul", names, ["Y"], n=n, m=m, shift=shift, variance_correction=vc),
                        {"X": x, "B": b, "channel_scale": cs, "shift_bias": sb, "bias": bias}, ["Y"])[0]
                r = ref.nm_sparse_matmul(x, b, n, m, shift, vc, cs, sb, bias)
                err = float(np.abs(y - r).max() / max(float(np.abs(r).max()), 1e-30))
                worst = max(worst, err)
                cases += 1
                if not err <= 1e-5:
                    failures.append(f"NMSparseMatMul {n}:{m} shift={shift} vc={vc}: relative error {err:.3g}")
    return CheckResult("d", CHECKS["d"], FAIL if failures else PASS, float(len(failures)),
                       "0 failing cases (masks bitwise, matmul relative error <= 1e-5)",
                       {"cases": cases, "failures": failures, "max_matmul_rel_error": worst})


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    an, bn = np.isnan(a), np.isnan(b)
    return bool((an == bn).all() and (a[~an] == b[~bn]).all())


def _close(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    an, bn = np.isnan(a), np.isnan(b)
    return bool((an == bn).all() and np.allclose(a[~an], b[~bn], rtol=1e-6, atol=1e-6, equal_nan=True))


# ------------------------------------------------------------------------------------------ driver
@dataclass
class ValidationReport:
    dense: str
    sparse: str
    model: str
    recipe: str
    calibration: str | None
    data: str
    results: list[CheckResult]
    bos: int | None = None  # the BOS id every window starts with (None: no BOS)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "results"}
        d["passed"] = self.passed
        d["failed_checks"] = [f"({r.check}) {r.name}" for r in self.results if not r.passed]
        d["checks"] = [{**asdict(r), "status": r.status} for r in self.results]
        return d


def _int8_activation_nodes(path) -> int:
    """MatMulNBits nodes of a model that quantize their activations (accuracy_level 4: int8 dot products)."""
    from onnx import helper

    from nm_onnx.graph.load import read_proto

    proto = read_proto(path, check_external=False)
    return sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits" and any(
        a.name == "accuracy_level" and helper.get_attribute_value(a) == 4 for a in n.attribute))


def _explain_int8_activations(results, dense, sparse) -> None:
    """A failed logits check of a model whose MatMulNBits quantize activations says so: the reference
    simulates the dequantized weights, not int8 activations (validate the sites with (b))."""
    for r in results:
        if r.status != FAIL or r.check not in ("a", "c"):
            continue
        count = _int8_activation_nodes(dense if r.check == "a" else sparse)
        if count:
            r.details.setdefault("failures", []).insert(0, (
                f"{count} MatMulNBits node(s) of the {'dense' if r.check == 'a' else 'sparse'} model use "
                "accuracy_level 4 (int8 activations), which the PyTorch reference does not simulate"
                + (" (nor int4 weights: the dense check compares with the float model)" if r.check == "a" else "")))


def _labelled(result: CheckResult, label: str) -> CheckResult:
    result.name += label
    return result


def validate(dense, sparse, model_source, recipe, calibration=None, checks: str = "abcde",
             seqlen: int = 256, limit: int = 4, data: str = "wikitext2", max_sites: int | None = None,
             model=None, tokenizer=None, bos: str = "auto") -> ValidationReport:
    """Run the chosen checks; `model`/`tokenizer` may be passed to reuse an already-loaded PyTorch model."""
    from nm_onnx.data import bos_id, eval_windows, load_eval_text, tokenize
    from nm_onnx.graph.load import model_file, read_proto
    from nm_onnx.recipe import SparsityRecipe

    bad = set(checks) - set(CHECKS)
    if bad or not checks:
        raise NmOnnxError(f"--checks takes letters from '{''.join(CHECKS)}', got {checks!r}")
    if "a" in checks:  # fail before loading torch or running anything
        read_proto(dense)
    records = []
    if set(checks) & {"b", "c", "e"}:
        records = sparse_records(read_proto(sparse), model_file(sparse))
    elif "d" in checks:  # (d) alone needs no sparse model; it adds the patterns of one that is there
        from nm_onnx.passes.record import site_records

        try:
            records = site_records(read_proto(sparse, check_external=False))
        except NmOnnxError:
            records = []
    patterns = sorted({(r["n"], r["m"]) for r in records if r.get("n") and r.get("m")})
    rec = SparsityRecipe.load(recipe)
    artifact = None
    if calibration:
        from nm_onnx.calibration import load_artifact

        artifact = load_artifact(calibration)
    if model is None and set(checks) & {"a", "b", "c", "e"}:
        from nm_onnx.models import check_context, check_model_source, resolve_model

        check_model_source(model_source)
        check_context(resolve_model(model_source), seqlen, "--seqlen")
    results: list[CheckResult] = []
    first = None
    if "d" in checks:
        _log("(d) op kernels vs numpy reference")
        results.append(check_kernels(patterns=patterns))
    text = load_eval_text(data)
    if set(checks) & {"a", "b", "c", "e"}:
        if model is None:
            from nm_onnx.models import load_hf_model

            _log(f"loading PyTorch model {model_source}")
            model, tokenizer = load_hf_model(model_source)
        first = bos_id(tokenizer, bos)
        windows = eval_windows(tokenize(tokenizer, text.text), seqlen, limit, first)
        if "a" in checks:
            _log("(a) dense ONNX vs PyTorch logits")
            results.append(check_dense_logits(dense, model, windows[:1]))
        from nm_onnx.reference import sparsify_model, unsparsify_model

        forms, form_dirs = dispatch_forms(sparse) if set(checks) & {"b", "c", "e"} else ({"": sparse}, [])
        if len(forms) > 1:
            _log("the sparse model dispatches on the token count (--prefill-dispatch): (b) and (c) check its "
                 "prefill and its decode form")
        quantized = quantized_weights(forms.get("decode", sparse)) if set(checks) & {"b", "c", "e"} else {}
        if quantized:
            _log(f"PyTorch reference with the sparse model's dequantized weights ({len(quantized)} linears)")
        saved = simulate_weights(model, quantized)
        try:
            sparsify_model(model, rec, artifact)
        except BaseException:
            restore_weights(model, saved)
            raise
        try:
            for form, path in forms.items():
                label = f" [{form} form]" if form else ""
                if "b" in checks:
                    _log(f"(b) layer-wise site parity{label}")
                    results.append(_labelled(check_layerwise(path, model, windows[0], max_sites), label))
                if "c" in checks:
                    _log(f"(c) teacher-forced logits{label}")
                    results.append(_labelled(check_teacher_forced(path, model, windows[0]), label))
            if "e" in checks:
                _log(f"(e) perplexity on {windows.shape[0]} windows x {seqlen}")
                results.append(check_perplexity(sparse, model, windows))
        finally:
            unsparsify_model(model)
            restore_weights(model, saved)
            for tmp in form_dirs:
                tmp.cleanup()
    _explain_int8_activations(results, dense, sparse)
    order = {c: i for i, c in enumerate(CHECKS)}
    results.sort(key=lambda r: order[r.check])
    return ValidationReport(str(dense), str(sparse), str(model_source), rec.name,
                            str(calibration) if calibration else None, text.source, results, first)


def add_arguments(p) -> None:
    """The validate arguments (shared by tools/validate.py and `nm-onnx validate`)."""
    from nm_onnx.commands._args import add_overwrite, at_least, positive
    from nm_onnx.data import BOS_CHOICES

    p.add_argument("dense", help="dense ONNX model (file or export directory)")
    p.add_argument("sparse", help="transformed (sparse) ONNX model")
    p.add_argument("--model", required=True, help="PyTorch source of the same model (alias, HF dir, .gguf)")
    p.add_argument("--recipe", required=True, help="recipe preset name or JSON file used by the transform")
    p.add_argument("--calibration", default=None, help="calibration artifact directory (if the recipe needs one)")
    p.add_argument("--checks", default="".join(CHECKS),
                   help=f"subset of the checks {', '.join(CHECKS)} (default all)")
    p.add_argument("--seqlen", type=at_least(2), default=256, help="tokens per window of real text (default 256)")
    p.add_argument("--limit", type=positive, default=4, help="windows for the perplexity report (e) (default 4)")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="begin every window with the BOS token: auto (as the tokenizer does), always, never")
    p.add_argument("--max-sites", type=positive, default=None, help="check only the first N sites in (b)")
    p.add_argument("--json", default=None, help="write the JSON report here (default: print it)")
    add_overwrite(p)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tools/validate.py", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    """Runs the checks of parsed arguments, prints them; exit status 0 (no FAIL), 1 (a FAIL), 2 (usage)."""
    import json

    from nm_onnx.io import check_output_file, json_kind, write_json

    try:
        if args.json:
            check_output_file(args.json, [args.dense, args.sparse], args.overwrite,
                              ours=lambda p: json_kind(p) == "validate", option="--json")
        rep = validate(args.dense, args.sparse, args.model, args.recipe, args.calibration, args.checks,
                       args.seqlen, args.limit, args.data, args.max_sites, bos=args.bos)
    except NmOnnxError as e:
        print(f"validate: error: {e}", file=sys.stderr)
        return 2
    for r in rep.results:
        print(r.line())
        for f in r.details.get("failures", [])[:5]:
            print(f"    {f}")
        if r.check == "c" and "reference_would_flip" in r.details:
            print(f"    masks replayed at {r.details['sites']} sites; left to itself the reference would choose "
                  f"{r.details['reference_would_flip']} of {r.details['mask_entries']} entries differently")
        if r.details.get("rel_se") is not None:
            print(f"    ORT {r.details['ort']:.4g} vs PyTorch {r.details['torch']:.4g} on {r.details['windows']} "
                  f"windows; paired noise +-{100 * r.details['rel_se']:.2f}% (1 s.e.)")
        if r.details.get("note"):
            print(f"    note: {r.details['note']}")
    d = rep.to_dict()
    if args.json:
        write_json(args.json, d, kind="validate")
    else:  # compact: the per-site table only goes to the --json file
        for c in d["checks"]:
            c["details"] = {k: v for k, v in c["details"].items() if k not in ("per_site", "window_rel_diff")}
        print(json.dumps(d, indent=2, default=float))
    if not rep.passed:
        print("FAILED: " + "; ".join(d["failed_checks"]), file=sys.stderr)
        return 1
    inconclusive = [f"({r.check})" for r in rep.results if r.status == INCONCLUSIVE]
    print("all checks passed" + (f" ({', '.join(inconclusive)} inconclusive, not a failure)" if inconclusive else ""),
          file=sys.stderr)
    return 0
