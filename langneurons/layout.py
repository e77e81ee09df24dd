"""The on-disk contract between the stages (docs/outputs.md): where each stage writes under `--out`, the
file names, the `<tag>` rule and the schema version. Every stage script, figures.py and the .sh scripts
find their files through here, so the layout is spelled out once:

    <out>/<tag>/neurons/            detection.py: meta.json, firing.safetensors, stats.json, <set>.json
    <out>/<tag>/deactivation.json   deactivation.py: perplexity per set and language, Imp, LAS
    <out>/<tag>/variants/<set>/     deactivation.py: a deactivated model folder
    <out>/<tag>/trained/<run>/      train.py: a trained model folder with train_log.json
    <out>/<tag>/eval/<name>.json    evaluate.py: accuracy and perplexity per task and language
    <out>/<tag>/steering/<name>.json steering.py: rate of generations in the target language per condition
    <out>/<tag>/means/...           evaluate.py, deactivation.py: mean neuron values (interventions)
    <out>/figures/                  figures.py: PNG figures and report.md

`<tag>` names the *base* model: a variant or a trained model carries its base's tag in its provenance
file, so everything made from one model lands in one folder.

    python -m langneurons.layout tag MODEL            prints <tag>
    python -m langneurons.layout neurons OUT MODEL    prints <out>/<tag>/neurons (also: variants, trained, eval)
    python -m langneurons.layout neurons FLAGS...     the same for a stage run with FLAGS (its --model, --out)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .cli import EMBEDDED_MODEL, InputError, common_parser
from .files import read_json, safe_name

# written into the metadata of every result file; raised when a file's shape changes, so a reader can tell
SCHEMA_VERSION = 2

PROVENANCE_FILE = "langneurons.json"  # in every model folder the pipeline writes: tag, base model, what was done
NEURON_FILE_COPY = "neurons.json"     # in a variant / trained model: the neuron file it was made from
TRAIN_LOG = "train_log.json"
META = "meta.json"
FIRING = "firing.safetensors"
PER_TEXT = "per_text.safetensors"          # neurons/: what each detection text selected
STABILITY = "stability.json"              # neurons/: set stability under resampling of the texts
STABILITY_FREQUENCIES = "stability.safetensors"  # neurons/: each neuron's selection frequency per set
STATS = "stats.json"
EXPERTS = "experts.json"  # neurons/ of an MoE model: tokens routed to each expert per language, expert sets
DEACTIVATION = "deactivation.json"
REPORT = "report.md"


def provenance(model: str) -> dict:
    """The provenance a pipeline-written model folder carries (empty for any other model)."""
    f = Path(model) / PROVENANCE_FILE
    if not f.is_file():
        return {}
    obj = read_json(f, f"--model {model}: provenance file")
    if not isinstance(obj, dict) or not isinstance(obj.get("tag", ""), str):
        raise InputError(f"--model {model}: provenance file {f}: expected an object with a string 'tag'")
    return obj


def split_revision(model: str) -> tuple[str, str | None]:
    """(hub id, revision) of `--model ID@REV` (what `--model ID --revision REV` becomes, cli.ArgumentParser), else
    (model, None). Only a hub id takes a revision: an existing path, a .gguf file, a path spelled as one
    (./, /, ~) and the embedded model are never split, whatever '@' they hold."""
    if ("@" not in model or model == EMBEDDED_MODEL or model.endswith(".gguf") or Path(model).exists()
            or model.startswith((".", "/", "~"))):
        return model, None
    hub_id, rev = model.split("@", 1)  # a hub id has no '@'; a revision may (and may hold '/': refs/pr/1)
    return hub_id, rev


def tag_part(text: str) -> str:
    """A tag safe-named around its '@' (`<name>@<revision>`, `<base>@<run>-step<N>`): each side is made
    filesystem-safe on its own, so that the revision stays readable in the folder name."""
    return "@".join(safe_name(part, "model") for part in text.split("@"))


def model_name(model: str) -> str:
    """The name of `model` itself: the embedded model's name, else its folder or file name without .gguf; a hub
    revision (`ID@REV`) gives `<name>@<REV>`, so the revisions of one model do not share a folder."""
    hub_id, rev = split_revision(model)
    if rev is not None:
        return f"{model_name(hub_id)}@{safe_name(rev, 'revision')}"
    name = EMBEDDED_MODEL if model == EMBEDDED_MODEL else Path(model.rstrip("/")).name
    return safe_name(name[:-5] if name.endswith(".gguf") else name, "model")


def model_tag(model: str) -> str:
    """`<tag>`: the name of the *base* model (a variant or trained model keeps its base's tag; a training
    checkpoint saved by train.py --save-every has its own, `<base tag>@<run>-step<N>`)."""
    tag = provenance(model).get("tag")
    return model_name(model) if tag is None else tag_part(tag)


def model_role(model: str) -> str:
    """What `model` is to its tag: 'base', or the stage that made it ('variant' / 'trained')."""
    return provenance_role(provenance(model))


def provenance_role(prov: dict) -> str:
    """The role a provenance record gives its model (figures.py reads it from eval files older than 'role')."""
    return "trained" if "trained_lang" in prov else "variant" if "neuron_set" in prov else "base"


@dataclass(frozen=True)
class Outputs:
    """Every path under `<out>/<tag>` (one model's outputs)."""
    root: Path

    @property
    def tag(self) -> str:
        return self.root.name

    @property
    def neurons(self) -> Path:
        return self.root / "neurons"

    def neuron_set(self, name: str) -> Path:
        return self.neurons / f"{name}.json"

    @property
    def deactivation(self) -> Path:
        return self.root / DEACTIVATION

    @property
    def variants(self) -> Path:
        return self.root / "variants"

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    def run(self, name: str) -> Path:
        return self.trained / name

    def checkpoints(self, run_name: str) -> Path:
        """Hidden sibling of the run folder: removed after success unless --keep-checkpoints."""
        return self.trained / f".{run_name}.ckpt"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def evaluation(self, name: str) -> Path:
        return self.eval / f"{name}.json"

    @property
    def steering(self) -> Path:
        return self.root / "steering"

    def steering_file(self, name: str) -> Path:
        return self.steering / f"{name}.json"

    def steerings(self) -> list[str]:
        """The names of every steering run of this tag, sorted (steering_file(name) is its file)."""
        return sorted(f.stem for f in self.steering.glob("*.json") if not f.name.startswith("."))
    def means(self, model: str, corpus: str, lang: str) -> Path:
        """<tag>/means/<model name>/<corpus>/<lang>/: the mean neuron values of one model (a variant or trained
        model of the tag has its own), corpus (detect, mgsm, or a safe-named spec with {lang} as LANG) and
        language (langneurons.interventions)."""
        name = corpus if corpus in ("detect", "mgsm") else safe_name(corpus.replace("{lang}", "LANG"), "corpus")
        return self.root / "means" / model_name(model) / name / lang

    def evaluations(self) -> list[str]:
        """The names of every evaluation of this tag, sorted (evaluation(name) is its file)."""
        return sorted(f.stem for f in self.eval.glob("*.json") if not f.name.startswith("."))

    def runs(self) -> list[str]:
        """The names of every trained run of this tag, sorted (hidden checkpoints and temporaries left out)."""
        return sorted(d.name for d in self.trained.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if self.trained.is_dir() else []

    def has_results(self) -> bool:
        return ((self.neurons / STATS).is_file() or self.deactivation.is_file() or self.eval.is_dir()
                or self.trained.is_dir() or self.steering.is_dir())


def outputs(out: str | Path, model: str) -> Outputs:
    """The output folder of `model` (a base model, or a variant or trained model of one) under `out`."""
    return Outputs(Path(out) / model_tag(model))


def tagged(out: str | Path) -> list[Outputs]:
    """Every `<out>/<tag>` that holds some stage's results, sorted by tag."""
    root = Path(out)
    found = [Outputs(d) for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    return [o for o in found if o.has_results()]


def figures_dir(out: str | Path) -> Path:
    return Path(out) / "figures"


def stage_outputs(argv: list[str]) -> Outputs:
    """The output folder of a stage run with the flags `argv`: its --model and --out as the stage reads them
    (the common flags and their defaults, cli.common_parser); its other flags are left to the stage."""
    args, _ = common_parser("", add_help=False).parse_known_args(argv)
    return outputs(args.out, args.model)


if __name__ == "__main__":  # for the .sh scripts: they never spell a path of their own
    what, *rest = sys.argv[1:] or ["--help"]
    if what == "tag" and len(rest) == 1:
        print(model_tag(rest[0]))
    elif what in ("neurons", "variants", "trained", "eval", "steering") and rest[:1] and rest[0].startswith("--"):
        print(getattr(stage_outputs(rest), what))
    elif what in ("neurons", "variants", "trained", "eval", "steering") and len(rest) == 2:
        print(getattr(outputs(rest[0], rest[1]), what))
    else:
        sys.exit(__doc__.split("\n\n")[-1])
