import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4] / "src"))
from nsa.train import load_model
from nsa.data import niah_example, stdlib_corpus
torch.set_num_threads(1)
m, cfg, _ = load_model(sys.argv[1]); m.eval()
val = stdlib_corpus("val", cfg.val_fraction)
for L in (64, 128, 512):
    g = torch.Generator().manual_seed(7 + L)
    exs = [niah_example(val, L, 0.5, g) for _ in range(6)]
    ids = torch.tensor([e.tokens for e in exs]); labels = torch.tensor([e.labels for e in exs]); mask = torch.tensor([e.answer for e in exs])
    with torch.no_grad():
        pred = m(ids).argmax(-1)
    for b, e in enumerate(exs):
        pos = mask[b].nonzero().flatten().tolist()
        print(L, e.info["key"], "truth", bytes(labels[b, pos].tolist()), "pred", bytes(pred[b, pos].tolist()), "gap", e.info["gap"])
