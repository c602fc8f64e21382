"""What ``scripts/e2e_vllm_cpu.sh`` requires of one case: prints it and exits non-zero when it does not hold.

Dense: after each version the engine verified the sync and generates exactly Hugging Face's greedy tokens
with the trainer's weights, and the two versions generate differently. MoE (vLLM-CPU cannot process an
update of its experts): every update is refused, nothing claims verified, and the engine generates
what it generated before.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(case: str, out: str, seconds: str) -> int:
    engine = json.loads(Path(out, "engine.json").read_text())
    trainer = json.loads(Path(out, "trainer.json").read_text())
    problems, lines = [], []
    for version, entry in engine["versions"].items():
        reports = [r for r in entry["reports"] if r]
        modes = sorted({r["mode"] for r in reports})
        lines.append(f"  version {version}: mode {','.join(modes)}; verified {[r['verified'] for r in reports]}; "
                     f"serving {[r['engine'].get('serving') for r in reports]}"
                     + (f"; refused: {entry['error'][:160]}" if "error" in entry else ""))
    if case.startswith("moe"):
        for version, entry in engine["versions"].items():
            # vLLM's RPC keeps the message, not the class: ReloadError's own words
            if "error" not in entry or "unprocessed layout" not in entry["error"]:
                problems.append(f"version {version} was not refused by the reload check")
            if any(r and r["verified"] for r in entry["reports"]):
                problems.append(f"version {version} claims verified")
            if entry["tokens"] != engine["before"]:
                problems.append(f"version {version}: the engine generates other tokens than before the refused update")
    else:
        hf = json.loads(Path(out, "hf_tokens.json").read_text())
        for version, entry in engine["versions"].items():
            if "error" in entry:
                problems.append(f"version {version}: {entry['error']}")
                continue
            if not all(r["verified"] for r in entry["reports"] if r):
                problems.append(f"version {version}: not verified")
            if entry["tokens"] != hf[version]:
                problems.append(f"version {version}: engine {entry['tokens']} != Hugging Face {hf[version]}")
        if hf["1"] == hf["2"]:
            problems.append("the two versions generate the same tokens: the comparison could not fail")
    verdict = "ok" if not problems else "FAILED"
    print(f"{case}: {verdict} ({seconds} s; trainer verified {trainer})")
    print("\n".join(lines))
    for p in problems:
        print(f"  - {p}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
