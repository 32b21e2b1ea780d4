import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4] / "src"))
from nsa.train import load_model
from nsa.data import niah_example, stdlib_corpus
torch.set_num_threads(2)
m, cfg, _ = load_model(sys.argv[1]); m.eval()
val = stdlib_corpus("val", cfg.val_fraction)
exs = []
for j, depth in enumerate((0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)):
    g = torch.Generator().manual_seed(4321 + 1000 * 512 + j)
    exs += [niah_example(val, 512, depth, g) for _ in range(16)]
first_ok = second_val = other = 0
for i in range(0, len(exs), 16):
    ch = exs[i:i+16]
    ids = torch.tensor([e.tokens for e in ch]); lab = torch.tensor([e.labels for e in ch]); mask = torch.tensor([e.answer for e in ch])
    with torch.no_grad():
        pred = m(ids).argmax(-1)
    for b in range(len(ch)):
        pos = mask[b].nonzero().flatten().tolist()
        p0, t0, t1 = int(pred[b, pos[0]]), int(lab[b, pos[0]]), int(lab[b, pos[1]])
        first_ok += p0 == t0; second_val += p0 == t1; other += p0 not in (t0, t1)
print(sys.argv[1].split('/')[-2], "first byte right", first_ok, "= second value byte", second_val, "other", other)
