"""Rewrite the README's allocation table from benchmarks/results/allocation.json (so the README
shows exactly the measured numbers): python readme_table.py"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["uniform", "owl", "hessian", "fisher", "msp"]


def table(entries: dict) -> str:
    rows = ["| target | pruner | uniform | OWL | Hessian (Shao) | Fisher only | MSP (Fisher + EA) | MSP / uniform | MSP / OWL |",
            "|---|---|---|---|---|---|---|---|---|"]
    for t in ["0.5", "0.6", "0.7", "0.8"]:
        for p in ["wanda", "sparsegpt"]:
            r = {m: entries.get(f"{m}/{p}@{t}") for m in METHODS}
            if not any(r.values()):
                continue

            def ppl(m):
                return f"{r[m]['ppl']:,.0f}" if r[m] else "—"

            def ratio(a, b):
                return f"{r[a]['ppl'] / r[b]['ppl']:.2f}x" if r[a] and r[b] else "—"

            msp = ppl("msp")
            if r["msp"] and r["msp"].get("searched_with"):
                msp += f" (map searched with {r['msp']['searched_with']})"
            elif r["msp"]:
                s = r["msp"]["search"]
                msp += f" ({s['generations']} gen., {s['seconds'] / 60:.0f} min)"
            rows.append(f"| {int(float(t) * 100)}% | {p} | {ppl('uniform')} | {ppl('owl')} | {ppl('hessian')} | "
                        f"{ppl('fisher')} | {msp} | {ratio('msp', 'uniform')} | {ratio('msp', 'owl')} |")
    for p in ["wanda", "sparsegpt"]:
        u, m = entries.get(f"uniform/{p}@2:4"), entries.get(f"msp/{p}@2:4")
        if u:
            mixed = "—"
            if m:
                how = f", map searched with {m['searched_with']}" if m.get("searched_with") else ""
                mixed = f"{m['ppl']:,.0f} (mixed 1:4/2:4/3:4{how})"
            ratio = f"{m['ppl'] / u['ppl']:.2f}x" if m else "—"
            rows.append(f"| 2:4 avg | {p} | {u['ppl']:,.0f} (uniform 2:4) | | | | {mixed} | {ratio} | |")
    return "\n".join(rows)


def main() -> None:
    entries = json.loads((ROOT / "benchmarks/results/allocation.json").read_text())["entries"]
    readme = ROOT / "README.md"
    s = readme.read_text()
    start = s.index("**Allocation methods**")
    head_end = s.index("\n\n", start) + 2
    end = s.index("\n\n", s.index("| target | pruner | uniform", head_end)) + 2
    marker = "<!-- results: allocation.md allocation.json -->\n"  # benchmarks/check_readme.py checks the table
    readme.write_text(s[:head_end] + marker + table(entries) + "\n\n" + s[end:])
    print(table(entries))


if __name__ == "__main__":
    main()
