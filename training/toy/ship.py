"""Ship a trained second toy world (v2) into the package: one command, all or nothing.

    python -m training.toy.ship OUT [--dest fusion_engine/worlds/toy/weights] [--run N] [--dry-run]

``OUT`` is the folder ``scripts/train_toy_world_v2.sh OUT`` wrote. The tool refuses (a clear error naming the
file at fault, nothing written) unless:

* OUT holds every file the package needs (``SHIPPED``), its ``base_config.json`` says ``"world": "v2"`` and
  every JSON reads;
* ``OUT/gates_v2.json`` says ``"all_pass": true``, agrees with its own per-gate verdicts and with
  ``OUT/gates.json``, and measured the gates fixed in ``training/toy/gates_v2_spec.json`` (the same ids and
  needs): the rule written before training (GATES_V2.md) is that the second world ships only if every gate
  passes. There is no flag around this, for any destination;
* what ships (the files and the card written here) is under ``LIMIT_BYTES`` (40 MiB).

Then the destination is replaced as a whole: the files are copied into a temporary folder beside it, checked,
the card ``CARD.md`` is written there from the JSONs (the world, every training run of the spec, the recipe and
wall times, the calibration, every gate, the LoRAs' delta-norm balance, the machine), and the folder is swapped
in by two renames (the old one back in place if the second fails). A failure at any point before the swap
leaves the destination as it was. Nothing else of OUT ships (checkpoints, logs, eval rows, sheets).
``--dry-run`` does every check and prints what would ship, writing nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from fusion_engine.errors import InputFileNotFoundError, LoRAFileError, OptionError
from fusion_engine.lora.safetensors_header import check_safetensors_file
from fusion_engine.worlds.toy import data, v2
from fusion_engine.worlds.toy.world import BASE_FILES, CLIP_FILE, DINO_FILE, STYLE_FILE, SUBJECT_FILE, WEIGHTS

from .resume import file_digest

SPEC = Path(__file__).with_name("gates_v2_spec.json")
WEIGHT_FILES = (*(f for f in BASE_FILES if f.endswith(".safetensors")), SUBJECT_FILE, STYLE_FILE, CLIP_FILE,
                DINO_FILE)
JSON_FILES = ("base_config.json", "gates.json", "gates_v2.json", "calibration_seen.json", "calibration_held.json",
              "lora_norms.json", "times_base.json", "times_judges.json", "times_subject.json", "times_style.json")
SHIPPED = (*WEIGHT_FILES, *JSON_FILES)  # what is copied; CARD.md is written
CARD = "CARD.md"
LIMIT_BYTES = 40 * 2**20  # the package's weights budget (issue 24: under 40 MB; tests/test_toy_world.py: 40 MiB)


# -- checks ----------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OptionError(f"{path}: not readable as JSON ({error})") from error
    if not isinstance(value, dict):
        raise OptionError(f"{path}: a JSON object expected, found {type(value).__name__}")
    return value


def check_complete(out: Path) -> dict[str, dict]:
    """Every shipped file is in ``out``; returns the JSONs read ({file name: object})."""
    if not out.is_dir():
        raise InputFileNotFoundError(f"{out}: no such folder (the OUT of scripts/train_toy_world_v2.sh)")
    missing = [name for name in SHIPPED if not (out / name).is_file()]
    if missing:
        raise InputFileNotFoundError(f"{out}: the world is incomplete, missing {', '.join(missing)} "
                                     "(scripts/train_toy_world_v2.sh writes them; rerun the stage that does)")
    jsons = {name: read_json(out / name) for name in JSON_FILES}
    if jsons["base_config.json"].get("world") != "v2":
        raise OptionError(f"{out / 'base_config.json'}: \"world\" is {jsons['base_config.json'].get('world')!r}, "
                          "not \"v2\": this tool ships the second world only")
    return jsons


def _gate_ids_and_needs(spec: dict) -> list[tuple]:
    return [(gate.get("id"), gate.get("need")) for gate in spec.get("gates", [])]


def check_gates(out: Path, jsons: dict, spec: dict) -> None:
    """The rule fixed before training: ship only if every gate passes, as measured against the fixed spec."""
    path, result = out / "gates_v2.json", jsons["gates_v2.json"]
    gates = result.get("gates")
    if not isinstance(gates, dict) or not gates:
        raise OptionError(f"{path}: no \"gates\" object")
    if _gate_ids_and_needs(result.get("spec", {})) != _gate_ids_and_needs(spec):
        raise OptionError(f"{path}: its \"spec\" gates (ids and needs) are not those fixed in {SPEC}; the world is "
                          "measured against the spec fixed before training or it does not ship")
    wanted = [gate_id for gate_id, _ in _gate_ids_and_needs(spec)]
    if list(gates) != wanted:
        raise OptionError(f"{path}: \"gates\" lists {list(gates)}, the spec {wanted}")
    failed = [name for name, gate in gates.items() if gate.get("pass") is not True]
    if result.get("all_pass") is not True or failed:
        raise OptionError(f"{path}: \"all_pass\" is {json.dumps(result.get('all_pass'))}"
                          + (f", failed: {', '.join(failed)}" if failed else "")
                          + ". The second world ships only if every gate passes (training/toy/GATES_V2.md); "
                          "nothing was written")
    kept = jsons["gates.json"]
    for name, gate in kept.get("gates", {}).items():  # measure_gates_v2 copies the five kept gates verbatim
        if name in gates and gates[name] != gate:
            raise OptionError(f"{out / 'gates.json'}: gate {name} is {json.dumps(gate)}, gates_v2.json has "
                              f"{json.dumps(gates[name])}: measured on other files?")
    if kept.get("all_pass") is not True:
        raise OptionError(f"{out / 'gates.json'}: \"all_pass\" is {json.dumps(kept.get('all_pass'))}")


def shipped_run(jsons: dict, spec: dict, run: int | None) -> dict:
    """The spec's entry ("runs") for the files in OUT: ``run`` if given, else the one run whose base and LoRA
    steps are the files' (times_base.json, times_subject.json); refused if the entry and the files disagree."""
    runs = spec.get("runs", [])
    steps = (jsons["times_base.json"].get("steps"), jsons["times_subject.json"].get("steps"),
             jsons["times_style.json"].get("steps"))
    matches = [r for r in runs if (r.get("base_unet_steps"), r.get("lora_steps"), r.get("lora_steps")) == steps]
    if run is None:
        if len(matches) != 1:
            raise OptionError(f"{SPEC}: {len(matches)} runs have base/LoRA steps {steps[0]}/{steps[1]} (the "
                              "files' times_base.json / times_subject.json): name the run with --run N")
        return matches[0]
    entry = next((r for r in runs if r.get("run") == run), None)
    if entry is None:
        raise OptionError(f"{SPEC}: no run {run} in \"runs\"")
    if entry not in matches:
        raise OptionError(f"{SPEC}: run {run} trained base/LoRA steps {entry.get('base_unet_steps')}/"
                          f"{entry.get('lora_steps')}, the files {steps[0]}/{steps[1]}/{steps[2]}")
    return entry


def shipped_bytes(out: Path, card: str) -> int:
    return sum((out / name).stat().st_size for name in SHIPPED) + len(card.encode())


def check_size(out: Path, card: str = "") -> int:
    """The bytes that ship (the files, and the card once written): refused at ``LIMIT_BYTES`` or more."""
    total = shipped_bytes(out, card)
    if total >= LIMIT_BYTES:
        sizes = ", ".join(f"{name} {(out / name).stat().st_size / 2**20:.1f}" for name in WEIGHT_FILES)
        raise OptionError(f"{out}: what would ship is {total / 2**20:.2f} MiB, the limit {LIMIT_BYTES / 2**20:.0f} "
                          f"MiB (MiB: {sizes})")
    return total


# -- the card ----------------------------------------------------------------------------------------------
def safetensors_summary(path: Path) -> tuple[int, str]:
    """(parameter count, dtypes) from a safetensors header, checked and read without loading the tensors
    (``fusion_engine.lora.safetensors_header``)."""
    try:
        header = check_safetensors_file(path)
    except (LoRAFileError, OSError) as error:
        raise OptionError(str(error)) from error
    entries = [entry for name, entry in header.items() if name != "__metadata__"]
    return sum(math.prod(entry["shape"]) for entry in entries), "/".join(sorted({entry["dtype"] for entry in entries}))


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _ci(value) -> str:
    """[mean, low, high] -> "0.025 [0.010, 0.043]"; a number as is."""
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"
    return _num(value)


def _short(value) -> str:
    """A recorded setting in a few words (a --branch-from record: its state and step)."""
    if isinstance(value, dict):
        return f"{value.get('state')} (step {value.get('step')})"
    return str(value)


def _gate_value(name: str, gate: dict) -> str:
    value = gate.get("value")
    if name == "judges_agree" and isinstance(value, dict):
        return "; ".join(f"{judge}: " + ", ".join(f"{axis} {'matched' if ok else 'NOT matched'}"
                                                  for axis, ok in axes.items()) for judge, axes in value.items())
    if name == "fusion_reachable" and isinstance(value, dict):
        best = value.get("best", {})
        confirmed = best.get("confirmed_on_fresh_seeds")
        return (f"best cell {best.get('policy')} at {best.get('pair')}: {_ci(best.get('joint'))}; on fresh seeds "
                + (_ci(confirmed) if confirmed is not None else "not run (below the need)")
                + ("; the scale grid was used" if gate.get("grid_used") else "; full strength"))
    if name == "symmetric_loras" and isinstance(value, dict):
        differ = gate.get("differ", [])
        fields = ", ".join(f"{field} {pair[0]}" for field, pair in value.items() if pair[0] == pair[1])
        return ("identical: " + fields) if not differ else f"differ in {', '.join(differ)}"
    return _ci(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def stage_log(out: Path) -> list[str]:
    """OUT/logs/times.txt's lines (the script's stage starts and ends), if OUT has it (it does not ship)."""
    path = out / "logs" / "times.txt"
    return path.read_text().splitlines() if path.is_file() else []


def write_card(out: Path, jsons: dict, spec: dict, run: dict) -> str:
    from .lora_norms import markdown

    base, judges = jsons["times_base.json"], jsons["times_judges.json"]
    recipes = {role: jsons[f"times_{role}.json"] for role in ("subject", "style")}
    gates_v2, kept = jsons["gates_v2.json"], jsons["gates.json"]
    seen, held = jsons["calibration_seen.json"], jsons["calibration_held.json"]
    norms = jsons["lora_norms.json"]
    verdict = ("**passes every gate fixed before training** (`gates_v2.json`: `all_pass` true)"
               if gates_v2.get("all_pass") is True else
               "**does NOT pass its gates** (`gates_v2.json`: `all_pass` false): not valid for ranking fusion policies")
    vocabulary = jsons["base_config.json"].get("tokenizer", {}).get("words", [])
    lines = [
        "# The toy world's weights (the second world, v2): how they were made",
        "",
        f"Written by `python -m training.toy.ship` from the training folder `{out}` (run {run.get('run')}); every "
        "number below is read from the JSON files shipped beside this card, which hold every seed's scores and "
        "decisions. Everything was trained from scratch on procedurally generated data "
        "(`fusion_engine/worlds/toy/data.py`, `v2.py`); nothing was downloaded. Remake it with "
        "`scripts/train_toy_world_v2.sh OUT`, then `python -m training.toy.ship OUT`, which ships a world only if "
        "every gate passes. The gates and their thresholds were fixed before any training "
        "(`training/toy/GATES_V2.md`, `gates_v2_spec.json`).",
        "",
        f"This world {verdict}.",
        "",
        "## World (`fusion_engine/worlds/toy/v2.py`)",
        f"32x32 RGB images. {len(v2.BASE_SHAPES)} base shapes ({', '.join(v2.BASE_SHAPES)}) x "
        f"{len(v2.BASE_STYLES)} base styles ({', '.join(v2.BASE_STYLES)}) = "
        f"{len(v2.SEEN_COMBOS) + len(v2.HELD_COMBOS)} combinations: the base model was trained on "
        f"{len(v2.SEEN_COMBOS)} and never shown the {len(v2.HELD_COMBOS)} held-out ones (in no image and no "
        "caption): " + ", ".join(f"{shape}/{style}" for shape, style in v2.HELD_COMBOS) + ".",
        f"Captions `a circle in stripes style`, `a circle`, `an image in stripes style`; a world vocabulary of "
        f"{len(vocabulary)} words, each one token (text encoder table "
        f"{jsons['base_config.json'].get('text_encoder', {}).get('vocab_size')} rows).",
        f"Held out of the base model: the subject (`{data.SUBJECT_PROMPT}`, a red-capped mushroom in its own "
        f"colours) and the style (`{data.STYLE_PROMPT}`). Fused prompt: `{data.FUSED_PROMPT}`.",
        "",
        "## Files",
        *_table(["file", "parameters", "dtype", "MiB", "sha256"],
                [[f"`{name}`", f"{count / 1e6:.2f} M", dtypes, f"{(out / name).stat().st_size / 2**20:.2f}",
                  f"`{file_digest(out / name)[:16]}`"]
                 for name in WEIGHT_FILES for count, dtypes in [safetensors_summary(out / name)]]),
        "",
        f"Beside them: `base_config.json` (the architectures, the scheduler, the vocabulary, `\"world\": \"v2\"`), "
        "`gates.json` (the five kept gates, every seed), `gates_v2.json` (all nine gates), `calibration_seen.json` "
        "/ `calibration_held.json`, `lora_norms.json`, `times_*.json` (recipes and wall times). Total shipped: "
        f"{shipped_bytes(out, ''):,} bytes plus this card (limit {LIMIT_BYTES / 2**20:.0f} MiB).",
        "",
        "## Training runs of this world (`gates_v2_spec.json` \"runs\", failed ones included)",
    ]
    for entry in spec.get("runs", []):
        this = " **(these files)**" if entry.get("run") == run.get("run") else ""
        lines.append(f"- **Run {entry.get('run')}**{this}, {entry.get('date')}: base UNet "
                     f"{entry.get('base_unet_steps')} steps, LoRAs {entry.get('lora_steps')} steps. "
                     + (f"Changed: {entry['changed']}. " if entry.get("changed") else "")
                     + (f"Why: {entry['reason']}. " if entry.get("reason") else "")
                     + (f"Result: {entry['result']}." if entry.get("result") else
                        "Result: the gates below." if this else "Result: not recorded in the spec."))
    lora_fields = ("rank", "alpha", "targets", "steps", "lr", "cosine", "ema", "batch", "prior_share",
                   "noise_offset", "resumed_from")
    lines += [
        "",
        "## Recipe and wall times (`times_*.json`)",
        f"Base: VAE {base.get('vae_steps')} steps ({base.get('vae_s')} s), UNet + text encoder {base.get('steps')} "
        f"steps ({base.get('unet_s')} s, summed over resumed sessions; the shipped weights are the EMA)"
        + "".join(f"; {label} {_short(base[key])}" for key, label in (("noise_offset", "noise offset"),
                                                                     ("resumed_from", "last resumed from step"),
                                                                     ("branched_from", "branched from"))
                  if base.get(key))
        + f". Judges: {judges.get('steps')} steps each (CLIP slot {judges.get('clip_s')} s, DINO slot "
        f"{judges.get('dino_s')} s).",
        "",
        "The two LoRAs, one recipe (gate 9; their data and seeds differ: "
        f"{spec.get('lora_recipe', {}).get('subject_data', '')}; {spec.get('lora_recipe', {}).get('style_data', '')}):",
        "",
        *_table(["LoRA", *lora_fields, "wall s"],
                [[role, *(recipe.get(field) for field in lora_fields), recipe.get("seconds")]
                 for role, recipe in recipes.items()]),
        "",
        f"Measuring: calibration seen {seen.get('wall_s')} s, held out {held.get('wall_s')} s, the five kept gates "
        f"{kept.get('wall_s')} s, gates 6-9 {gates_v2.get('wall_s')} s.",
    ]
    log = stage_log(out)
    if log:
        lines += ["", "The training script's stage log (`OUT/logs/times.txt`, UTC):", "", "```", *log, "```"]
    settings = seen.get("settings", {})
    lines += [
        "",
        f"## Calibration of the base ({settings.get('sampler')} {settings.get('steps')} steps, CFG "
        f"{settings.get('guidance')}, seeds 0-{(settings.get('seeds_per_combination') or 1) - 1} per combination)",
        "Rates with 95% bootstrap intervals over the images; the gates are fractions of the seen rates.",
        "",
        *_table(["decision", f"seen combinations ({seen.get('images')} images)",
                 f"held-out combinations ({held.get('images')} images)"],
                [[kind, _ci(seen["rates"].get(f"{kind}_decision")), _ci(held["rates"].get(f"{kind}_decision"))]
                 for kind in ("shape", "style", "joint")]),
        "",
        "Seen, per shape (shape decision): " + ", ".join(
            f"{shape} {rates['shape_decision'][0]:.2f}" for shape, rates in seen.get("per_shape", {}).items()) + ".",
        "Seen, per style (style decision): " + ", ".join(
            f"{style} {rates['style_decision'][0]:.2f}" for style, rates in seen.get("per_style", {}).items()) + ".",
        "",
        "## Gates (`gates_v2.json`; gates 1-5 also in `gates.json` with every seed)",
        *_table(["#", "gate", "set", "need", "measured", "verdict"],
                [[number, name, next((g.get("set", "") for g in spec.get("gates", []) if g.get("id") == name), ""),
                  gate.get("need"), _gate_value(name, gate), "pass" if gate.get("pass") else "**FAIL**"]
                 for number, (name, gate) in enumerate(gates_v2.get("gates", {}).items(), 1)]),
    ]
    fusion = gates_v2.get("gates", {}).get("fusion_reachable", {})
    if fusion.get("cells"):
        lines += ["", "Gate 8, joint success per cell (`pair@subject x style scale`, policy), seeds 0-49:", "",
                  *_table(["cell", "joint [95% CI]"], [[f"`{cell}`", _ci(v)] for cell, v in fusion["cells"].items()])]
    summary = norms.get("summary", {})
    ratio = summary.get("shared_ratio_subject_over_style") or {}
    lines += [
        "",
        "## The LoRAs' balance (`lora_norms.json`, `training/toy/lora_norms.py`)",
        "Per layer `alpha / rank * ||B A||_F` at strength 1. FLS keeps the branch that moves the prediction more, so "
        "a systematically larger LoRA wins by construction; this table shows the balance before any trace.",
        f"Total delta norm: subject {summary.get('total_norm', {}).get('subject')}, style "
        f"{summary.get('total_norm', {}).get('style')}; layers: "
        + ", ".join(f"{kind} {count}" for kind, count in summary.get("layers", {}).items()) + "; on the shared layers "
        f"subject / style median {ratio.get('median')} ({ratio.get('min')} to {ratio.get('max')}), the subject "
        f"larger in {ratio.get('layers_subject_larger')}.",
        "",
        markdown(norms).rstrip("\n"),
        "",
        "## Machine",
        "As recorded by each step: calibration: " + str(seen.get("machine")) + "; kept gates: "
        + str(kept.get("machine")) + "; gates 6-9: " + str(gates_v2.get("machine")) + ". This card was written "
        f"on {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs.",
        "",
    ]
    return "\n".join(lines)


# -- the swap ----------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def install(out: Path, dest: Path, card: str, copy=shutil.copyfile) -> None:
    """Replace ``dest`` by a folder holding exactly ``SHIPPED`` from ``out`` and the card: staged beside ``dest``,
    checked, then swapped in; ``dest`` is as it was if anything fails before the swap. The folder and files get
    ordinary modes (0777 / 0666 less the umask), not the temporary folder's 0700 or a trainer's 0600."""
    dest = Path(os.path.abspath(dest))
    if not dest.parent.is_dir():
        raise InputFileNotFoundError(f"{dest.parent}: the destination's parent folder does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    old = None
    try:
        os.chmod(staging, 0o777 & ~_umask())
        for name in SHIPPED:
            copy(out / name, staging / name)
            if (staging / name).stat().st_size != (out / name).stat().st_size:
                raise OptionError(f"{staging / name}: the copy's size differs from {out / name}")
        (staging / CARD).write_text(card)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            old.rmdir()
            os.rename(dest, old)
        try:
            os.rename(staging, dest)
        except BaseException:
            if old is not None:
                os.rename(old, dest)
                old = None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def prepare(out: Path, run: int | None = None) -> tuple[str, int]:
    """Every check; (the card, the bytes that would ship). Raises before anything is written."""
    out = Path(out)
    jsons = check_complete(out)
    spec = read_json(SPEC)
    check_gates(out, jsons, spec)
    entry = shipped_run(jsons, spec, run)
    check_size(out)  # before the card reads the weights' headers
    card = write_card(out, jsons, spec, entry)
    return card, check_size(out, card)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder scripts/train_toy_world_v2.sh wrote")
    parser.add_argument("--dest", default=str(WEIGHTS), help="default: the package's weights folder")
    parser.add_argument("--run", type=int, default=None,
                        help="the spec's run number of these files (default: the run whose steps they have)")
    parser.add_argument("--dry-run", action="store_true", help="check and print what would ship; write nothing")
    args = parser.parse_args(argv)
    out, dest = Path(args.out), Path(args.dest)
    if os.path.abspath(out) == os.path.abspath(dest):
        parser.error("OUT and --dest are the same folder")
    try:
        card, total = prepare(out, args.run)
        if args.dry_run:
            for name in SHIPPED:
                print(f"  {name}  {(out / name).stat().st_size:,} bytes")
            print(f"  {CARD}  {len(card.encode()):,} bytes (written from the JSONs)")
            old = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
            dropped = [name for name in old if name not in (*SHIPPED, CARD)]
            print(f"dry run: {total:,} bytes would replace {dest}" + (f" (dropping {', '.join(dropped)})" if dropped
                                                                         else "") + "; nothing written")
            return 0
        install(out, dest, card)
    except OptionError as error:
        print(f"ship: refused: {error}", file=sys.stderr)
        return 2
    print(f"shipped {out} -> {dest} ({total:,} bytes, {len(SHIPPED)} files and {CARD})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
