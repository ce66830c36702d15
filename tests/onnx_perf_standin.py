"""A stand-in for onnxruntime's ``onnxruntime_perf_test``, honouring the command-line contract edgequant uses
(``edgequant.bench.onnx_device``) and running the model for real with onnxruntime's Python API.

    onnxruntime_perf_test -e cpu -m times -r REPS -x THREADS -y 1 [-o LEVEL] MODEL RESULT_FILE

Like the real tool it reads ``test_data_set_*/input_*.pb`` beside MODEL (TensorProtos named after the
inputs), fails with "there is no test data" when they are missing, runs one warm-up and REPS timed
runs, appends ``name,seconds,peak_working_set,cpu,index`` lines to RESULT_FILE and prints the session
creation time and the peak working set.  It also records, in ``standin_seen.txt`` in the current
directory, the shapes it was fed, so a test can check what reached the "device".

Only for tests: phone figures need the real tool built for Android (see the README).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    opts: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-e", "-m", "-r", "-x", "-y", "-o"):
            opts[a] = argv[i + 1]
            i += 2
        elif a.startswith("-"):
            print(f"unknown option {a}", file=sys.stderr)
            return 2
        else:
            rest.append(a)
            i += 1
    if len(rest) != 2 or opts.get("-m") != "times" or opts.get("-e", "cpu") != "cpu":
        print("usage: onnxruntime_perf_test -e cpu -m times -r N -x T -y 1 model result_file", file=sys.stderr)
        return 2
    model, result = Path(rest[0]), Path(rest[1])
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    feeds = {}
    for p in sorted(model.parent.glob("test_data_set_0/input_*.pb")):
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        feeds[t.name] = numpy_helper.to_array(t)
    if not feeds:
        print(f"there is no test data for model {model.parent.name}")
        return 255
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(opts.get("-x", "1"))
    so.inter_op_num_threads = int(opts.get("-y", "1"))
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - printed like the tool's own failure
        print(f"Load model from {model} failed: {exc}", file=sys.stderr)
        return 255
    created = time.perf_counter() - t0
    Path("standin_seen.txt").write_text("\n".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items()))
    sess.run(None, feeds)  # warm-up
    reps = int(opts.get("-r", "1000"))
    costs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        costs.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(result, "a") as fh:
        for idx, c in enumerate(costs):
            fh.write(f"{model.parent.name},{c},{peak},50,{idx}\n")
    print(f"Session creation time cost: {created} s")
    print(f"Total inference requests: {reps}")
    print(f"Average inference time cost: {sum(costs) / reps * 1000} ms")
    print(f"Peak working set size: {peak} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
