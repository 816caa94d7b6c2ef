"""ONNX Runtime alone: dense vs static compact, 1 and 2 intra-op threads, spinning on and off.

Usage: ``python benchmarks/ort_threads.py`` (runs ``/tmp/d14/r56`` and the record ResNet-20 run;
edit the list below). Medians of 40 alternating calls, printed per run and batch size.
"""

import io
import warnings

import onnxruntime as ort
import torch

from nd_plugin.engines import side_by_side
from nd_plugin.pruning import apply_record, fold_batchnorm, static_record
from nd_plugin.pruning.plan import plain_copy
from nd_plugin.run import open_run

torch.set_num_threads(2)
for rd in ["/tmp/d14/r56", "/tmp/record/runs/decoupling_R=0.5"]:
    r = open_run(rd); dm = r.build_model().eval(); st = r.stats()
    x = torch.stack([r.data().val[i][0] for i in range(0, 2000, 100)])
    dense = fold_batchnorm(plain_copy(dm.model), x[:1]); stat = fold_batchnorm(plain_copy(apply_record(dm, static_record(dm, st, round_to=8)).model), x[:1])
    def sess(m, threads, spin):
        b = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (x[:1],), b, input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
        o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        s = ort.InferenceSession(b.getvalue(), o, providers=["CPUExecutionProvider"])
        return lambda t: s.run(None, {"input": t.numpy()})
    for bsz in (1, 32):
        xs = [x[:1]] * 8 if bsz == 1 else [x.repeat(2, 1, 1, 1)[:32]]
        fns = {f"{n} {t}t spin{int(sp)}": sess(m, t, sp) for n, m in (("dense", dense), ("static", stat)) for t in (1, 2) for sp in (True, False)}
        ms = side_by_side(fns, xs, 40)
        print(rd, "b", bsz, {k: round(v, 3) for k, v in ms.items()}, flush=True)
