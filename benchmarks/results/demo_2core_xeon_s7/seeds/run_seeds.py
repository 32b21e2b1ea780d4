"""NSA-only demo runs (train + the demo's evaluation) for seeds given on the command line, two at a time."""
import json, sys, multiprocessing as mp
from nsa.evaluate import _demo_run

def one(seed, pos):
    res = _demo_run("nsa", f"/tmp/seeds/s{seed}", "tiny-cpu", {"seed": seed}, False, 16, 32, 1, pos)
    n = res["niah_at_T"]
    print(json.dumps({"seed": seed, "val_loss": res["val"]["loss"], "niah_all": n["accuracy_all"],
                      "niah_inside": n["inside_window"], "niah_beyond": n["beyond_window"],
                      "mqar": res["mqar"]["accuracy"], "train_s": res["train"].get("train_time")}), flush=True)

if __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[1:]]
    ctx = mp.get_context("spawn")
    for i in range(0, len(seeds), 2):
        ps = [ctx.Process(target=one, args=(s, j)) for j, s in enumerate(seeds[i:i + 2])]
        for p in ps: p.start()
        for p in ps: p.join()
