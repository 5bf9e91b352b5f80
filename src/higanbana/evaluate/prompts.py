"""Prompt sets of the evaluation framework (docs/design.md §5).

One file on purpose: the concepts, the prompt types' templates and the trigger rules for CLIP are
one definition of what is generated and measured.

Four prompt types are evaluated separately: ``train`` (the training captions), ``trigger`` (the
concept descriptor alone), ``alter`` (content changes) and ``style`` (style changes). Each
(concept, prompt type) gets ``n_images`` images spread over its prompts in order, with
consecutive seeds from ``seed_start``, so that the base and every fine-tuned model pair up by
(prompt, seed). Before CLIP text encoding the trigger word is removed or replaced by the class
word according to a per-category rule (:func:`process_for_clip`).

The template texts below are our own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, nearest
from ..safeio import check_name
from ..schema import load_toml, read_text

__all__ = [
    "ALTER_TEMPLATES",
    "CATEGORIES",
    "DEFAULT_RULES",
    "IMAGE_EXTENSIONS",
    "PROMPT_TYPES",
    "RULES",
    "STYLE_TEMPLATES",
    "Concept",
    "PromptItem",
    "build_all",
    "build_prompt_set",
    "clip_rule_for",
    "concepts_from_toml",
    "process_for_clip",
    "prompts_for",
    "spread",
]

PROMPT_TYPES = ("train", "trigger", "alter", "style")
CATEGORIES = ("person", "object", "scene", "style")
RULES = ("drop_trigger", "replace_with_class", "drop_descriptor", "keep")
DEFAULT_RULES: dict[str, str] = {
    "person": "drop_trigger",
    "object": "replace_with_class",
    "scene": "replace_with_class",
    "style": "drop_descriptor",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# "{}" is replaced by the concept descriptor ("trigger class_word").
ALTER_TEMPLATES: dict[str, list[str]] = {
    "person": [
        "{} wearing a space suit, floating inside a space station",
        "{} in shining knight armor, holding a sword in a castle courtyard",
        "{} dressed as a firefighter, standing in front of a red fire truck",
        "{} riding a bicycle along a park path in autumn",
        "{} playing the violin on a concert stage under spotlights",
        "{} wearing a yellow raincoat, holding an umbrella on a rainy street",
        "{} sitting at a desk, reading a thick book in an old library",
        "{} in a wetsuit, surfing a large ocean wave",
        "{} wearing a winter coat and a scarf, building a snowman",
        "{} in a lab coat, pouring colorful liquids in a laboratory",
    ],
    "object": [
        "{} sitting on a wooden bench in a city park",
        "{} lying on a sandy beach next to a seashell",
        "{} floating on the water of a swimming pool",
        "{} placed on top of a stack of old books",
        "{} made of clear glass, standing on a sunny windowsill",
        "{} carved from white marble, displayed in a museum",
        "{} half buried in snow beside a pine tree",
        "{} inside a shopping cart in a supermarket aisle",
        "{} on a kitchen counter next to a bowl of fruit",
        "{} knitted from red wool, resting on a sofa",
    ],
    "scene": [
        "{} at night under a full moon",
        "{} covered in fresh snow in the middle of winter",
        "{} in thick fog at dawn",
        "{} during a thunderstorm with lightning in the sky",
        "{} in autumn with orange and red leaves everywhere",
        "{} at sunset under a pink and purple sky",
        "{} with a hot air balloon drifting above",
        "{} with a flock of birds flying overhead",
        "{} with a family having a picnic in the foreground",
        "{} with fireworks exploding in the night sky",
    ],
    "style": [
        "a lighthouse standing on a rocky cliff, {}",
        "a bowl of ramen on a wooden table, {}",
        "a red fox sleeping under an oak tree, {}",
        "an old man playing chess in a park, {}",
        "a crowded train station at rush hour, {}",
        "a sailing ship on a stormy sea, {}",
        "a cat sitting on a windowsill at dusk, {}",
        "a small mountain village in spring, {}",
        "a robot watering flowers in a greenhouse, {}",
        "a girl reading under a street lamp at night, {}",
    ],
}

# Style changes; not used for concepts of the "style" category.
STYLE_TEMPLATES: list[str] = [
    "{} drawn as a rough charcoal sketch",
    "{} as a soft watercolor illustration",
    "{} painted with thick impasto oil brushstrokes",
    "{} as a traditional woodblock print",
    "{} as a retro 8-bit video game sprite",
    "{} as a colorful stained glass window",
]


@dataclass
class Concept:
    """One concept (or sub-class) to evaluate: its trigger, class word and training data."""

    name: str
    trigger: str
    class_word: str
    category: str
    train_captions: list[str] = field(default_factory=list)
    train_images: list[str] = field(default_factory=list)
    subclass: str = ""
    clip_rule: str = ""  # overrides the category's default trigger rule; "" = default

    def __post_init__(self) -> None:
        # the name is a folder of the evaluation's images and features: one plain path component
        check_name(self.name, "concept name")
        if not self.trigger.strip():
            raise ConfigError(f"concept {self.name!r}: 'trigger' must not be empty")
        if self.category not in CATEGORIES:
            raise ConfigError(
                f"concept {self.name!r}: 'category' must be one of {CATEGORIES}, got {self.category!r}"
                f"{nearest(str(self.category), CATEGORIES)}"
            )
        if self.clip_rule:
            _check_rule(self.clip_rule, f"concept {self.name!r}: 'clip_rule'")

    @property
    def descriptor(self) -> str:
        """``"trigger class_word"``, or just the trigger when there is no class word."""
        return f"{self.trigger.strip()} {self.class_word.strip()}".strip()


@dataclass(frozen=True)
class PromptItem:
    """One image to generate: its prompt, the CLIP text for it, and its seed."""

    concept: str
    prompt_type: str
    prompt: str
    clip_text: str
    seed: int
    index: int
    prompt_index: int

    @property
    def key(self) -> str:
        """Stable id ``concept/prompt_type/index`` (used for cache file names)."""
        return f"{self.concept}/{self.prompt_type}/{self.index}"


# ---------------------------------------------------------------------------------------------
# spreading images over prompts


def spread(n_images: int, n_prompts: int) -> list[int]:
    """Images per prompt: prompt i gets ``n // k`` (+1 if ``i < n % k``); with ``k > n`` only the
    first ``n`` prompts get one image each (the list has ``min(n, k)`` entries)."""
    if n_images < 0:
        raise ConfigError(f"n_images must be >= 0, got {n_images}")
    if n_prompts < 1:
        raise ConfigError(f"n_prompts must be >= 1, got {n_prompts}")
    k = min(n_prompts, n_images)
    if k == 0:
        return []
    base, extra = divmod(n_images, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# prompt lists


def _check_type(prompt_type: str) -> None:
    if prompt_type not in PROMPT_TYPES:
        raise ConfigError(
            f"prompt_type must be one of {PROMPT_TYPES}, got {prompt_type!r}{nearest(str(prompt_type), PROMPT_TYPES)}"
        )


def check_templates(templates: object, what: str) -> None:
    """Refuse anything but a list of strings with exactly one ``{}`` (the descriptor) each."""
    if not isinstance(templates, list | tuple):
        raise ConfigError(f"{what} must be a list of strings, each with exactly one '{{}}' (the descriptor)")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(
                f"{what} must be a list of strings, each with exactly one '{{}}' (the descriptor), got {t!r}"
            )


def _fill(templates: Sequence[str], descriptor: str, what: str) -> list[str]:
    check_templates(templates, what)
    return [t.replace("{}", descriptor) for t in templates]


def prompts_for(
    concept: Concept,
    prompt_type: str,
    *,
    alter_templates: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    style_templates: Sequence[str] | None = None,
) -> list[str]:
    """The prompt list of a type: ``train`` = the captions (deduplicated, in order); ``trigger`` =
    ``[descriptor]``; ``alter`` / ``style`` = templates filled with the descriptor. ``alter_templates``
    is a list or a per-category dict; ``style`` gives ``[]`` for style-category concepts."""
    _check_type(prompt_type)
    if prompt_type == "train":
        seen: dict[str, None] = {}
        for caption in concept.train_captions:
            text = " ".join(str(caption).split())
            if text:
                seen.setdefault(text, None)
        return list(seen)
    if prompt_type == "trigger":
        return [concept.descriptor]
    if prompt_type == "alter":
        templates = ALTER_TEMPLATES if alter_templates is None else alter_templates
        if isinstance(templates, Mapping):
            if concept.category not in templates:
                raise ConfigError(f"alter_templates has no entry for category {concept.category!r}")
            templates = templates[concept.category]
        return _fill(templates, concept.descriptor, "alter_templates")
    if concept.category == "style":  # the paper does not restyle style concepts
        return []
    templates = STYLE_TEMPLATES if style_templates is None else style_templates
    return _fill(templates, concept.descriptor, "style_templates")


def build_prompt_set(
    concept: Concept,
    prompt_type: str,
    *,
    n_images: int = 100,
    seed_start: int = 1000,
    alter_templates: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    style_templates: Sequence[str] | None = None,
    clip_rules: Mapping[str, str] | None = None,
) -> list[PromptItem]:
    """``n_images`` items spread over the type's prompts in order, seeds ``seed_start + index``.

    The ``style`` type of a style-category concept is an empty list (as in the paper). ``train``
    without captions is a :class:`ConfigError`. ``clip_rules`` maps category -> rule name.
    """
    prompts = prompts_for(concept, prompt_type, alter_templates=alter_templates, style_templates=style_templates)
    if not prompts:
        if prompt_type == "train":
            raise ConfigError(f"concept {concept.name!r}: no training 'captions' for the 'train' prompt type")
        return []
    rule = clip_rule_for(concept, clip_rules)
    items: list[PromptItem] = []
    for p_idx, count in enumerate(spread(n_images, len(prompts))):
        clip_text = process_for_clip(prompts[p_idx], concept, rule)
        for _ in range(count):
            index = len(items)
            items.append(
                PromptItem(
                    concept=concept.name,
                    prompt_type=prompt_type,
                    prompt=prompts[p_idx],
                    clip_text=clip_text,
                    seed=seed_start + index,
                    index=index,
                    prompt_index=p_idx,
                )
            )
    return items


def build_all(concepts: Iterable[Concept], prompt_types: Sequence[str] = PROMPT_TYPES, **kw) -> list[PromptItem]:
    """:func:`build_prompt_set` for every concept and prompt type, concatenated in that order."""
    if isinstance(prompt_types, str):
        prompt_types = (prompt_types,)
    for t in prompt_types:
        _check_type(t)
    concepts = list(concepts)
    dupes = _duplicates([c.name for c in concepts])
    if dupes:
        raise ConfigError(f"duplicate concept name(s) {dupes}: prompt keys would collide")
    return [item for c in concepts for t in prompt_types for item in build_prompt_set(c, t, **kw)]


def alter_diversity_warnings(items: Iterable[PromptItem]) -> list[str]:
    """Warnings for concepts whose ``alter`` prompts get a single image each: the alter diversity
    is a Vendi score *per prompt* (averaged over prompts), and one image scores exactly 1, so the
    criterion would say nothing. Raise ``n_images`` or use fewer alter templates."""
    counts: dict[str, dict[int, int]] = {}
    for it in items:
        if it.prompt_type == "alter":
            per_prompt = counts.setdefault(it.concept, {})
            per_prompt[it.prompt_index] = per_prompt.get(it.prompt_index, 0) + 1
    out = []
    for concept, per_prompt in counts.items():
        single = sum(1 for n in per_prompt.values() if n < 2)
        if single:
            out.append(
                f"concept {concept!r}: {single} of {len(per_prompt)} alter prompts get one image, so their "
                "diversity (Vendi per prompt) is pinned to 1: raise prompts.n_images to at least twice the "
                "number of alter templates, or use fewer templates (prompts.alter_templates)"
            )
    return out


# ---------------------------------------------------------------------------------------------
# trigger processing before CLIP text encoding


def _check_rule(rule: str, what: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"{what} must be one of {RULES}, got {rule!r}{nearest(str(rule), RULES)}")


def clip_rule_for(concept: Concept, rules: Mapping[str, str] | None = None) -> str:
    """The trigger rule of a concept: its own ``clip_rule``, else ``rules[category]``, else the
    default of :data:`DEFAULT_RULES`."""
    if concept.clip_rule:
        return concept.clip_rule
    if rules is not None:
        unknown = [k for k in rules if k not in CATEGORIES]
        if unknown:
            raise ConfigError(f"clip_rules: unknown category {unknown[0]!r}{nearest(unknown[0], CATEGORIES)}")
        if concept.category in rules:
            _check_rule(rules[concept.category], f"clip_rules[{concept.category!r}]")
            return rules[concept.category]
    return DEFAULT_RULES[concept.category]


def _phrase(text: str) -> str:
    """Regex of a (multi-word) phrase matched as whole words, case-sensitive."""
    return r"(?<!\w)" + r"\s+".join(re.escape(w) for w in text.split()) + r"(?!\w)"


def _clean(text: str) -> str:
    """Collapse spaces, drop spaces before punctuation and empty comma slots, strip leading
    commas and a leading ``of``."""
    s = re.sub(r"\s+", " ", text)
    s = re.sub(r"\s+([,.;:!?])", r"\1", s)
    s = re.sub(r",(?:\s*,)+", ",", s)
    prev = None
    while prev != s:
        prev = s
        s = s.strip(" ,")
        s = re.sub(r"^of(?=[\s,]|$)", "", s, flags=re.IGNORECASE)
    return s


def process_for_clip(prompt: str, concept: Concept, rule: str | None = None) -> str:
    """The prompt as CLIP text: ``drop_trigger`` removes the trigger (person); ``replace_with_class``
    puts the class word in its place without doubling it (object, scene); ``drop_descriptor``
    removes trigger and adjacent class word (style); ``keep`` leaves both. The trigger matches as
    whole words, case-sensitive. ``rule`` overrides :func:`clip_rule_for`. The result is cleaned
    (spaces, commas, leading "of"); it may be empty (e.g. a style concept's trigger prompt)."""
    rule = clip_rule_for(concept) if rule is None else rule
    _check_rule(rule, "rule")
    trigger = _phrase(concept.trigger)
    cls = concept.class_word.strip()
    if rule == "keep" or not concept.trigger.strip():
        out = prompt
    elif rule == "drop_trigger" or (rule == "replace_with_class" and not cls):
        out = re.sub(trigger, " ", prompt)
    else:
        # the trigger with an optional class word on either side, so none is left or doubled
        c = _phrase(cls)
        pattern = rf"(?:{c}\s*)?{trigger}(?:\s*{c})?"
        out = re.sub(pattern, f" {cls} " if rule == "replace_with_class" else " ", prompt)
    return _clean(out)


# ---------------------------------------------------------------------------------------------
# TOML

_CONCEPT_KEYS = (
    "name",
    "trigger",
    "class_word",
    "category",
    "subclass",
    "captions",
    "images",
    "caption_dir",
    "caption_extension",
    "clip_rule",
)
_REQUIRED = ("name", "trigger", "category")


def _read_folder(name: str, images_dir: Path | None, caption_dir: Path | None, ext: str) -> tuple[list[str], list[str]]:
    """Images of ``images_dir`` (or ``caption_dir``) and the captions beside them (same stem)."""
    folder = images_dir or caption_dir
    for key, path in (("images", images_dir), ("caption_dir", caption_dir)):
        if path is not None and not path.is_dir():
            raise ConfigError(f"concept {name!r}: {key!r} folder {str(path)!r} does not exist")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        key = "images" if images_dir is not None else "caption_dir"
        raise ConfigError(f"concept {name!r}: {key!r} folder {str(folder)!r} holds no images {IMAGE_EXTENSIONS}")
    cap_folder = caption_dir or folder
    captions = []
    for img in images:
        txt = cap_folder / (img.stem + ext)
        if txt.is_file():
            text = read_text(txt, "caption file").strip()
            if text:
                captions.append(text)
    return [str(p) for p in images], captions


def concepts_from_toml(path) -> list[Concept]:
    """Concepts of a TOML file's ``[[concept]]`` list.

    Keys: ``name``, ``trigger``, ``category`` (required), ``class_word``, ``subclass``,
    ``clip_rule``, ``captions`` (a list), ``images`` (a folder of images with captions beside
    them), ``caption_dir`` (where the captions are, default the images folder; alone, it is also the
    images folder) and ``caption_extension`` (default ``.txt``). Relative folders are resolved
    against the TOML file's folder. Captions of ``captions`` come before those of the folder.
    """
    path = Path(path)
    doc = load_toml(path, "concept file")
    extra = [k for k in doc if k != "concept"]
    if extra:
        raise ConfigError(f"{path}: unknown top-level key {extra[0]!r}{nearest(extra[0], ['concept'])}")
    entries = doc.get("concept")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty [[concept]] list")
    concepts: list[Concept] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: concept #{i + 1} must be a table ([[concept]]), got {entry!r}")
        label = repr(entry.get("name", f"#{i + 1}"))
        for key in entry:
            if key not in _CONCEPT_KEYS:
                raise ConfigError(f"{path}: concept {label}: unknown key {key!r}{nearest(key, _CONCEPT_KEYS)}")
        for key in _REQUIRED:
            if key not in entry:
                raise ConfigError(f"{path}: concept {label}: missing required key {key!r}")
        for key in ("name", "trigger", "category", "class_word", "subclass", "clip_rule", "caption_extension"):
            if key in entry and not isinstance(entry[key], str):
                raise ConfigError(f"{path}: concept {label}: {key!r} must be a string")
        captions = entry.get("captions", [])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ConfigError(f"{path}: concept {label}: 'captions' must be a list of strings")
        captions = list(captions)
        images: list[str] = []
        dirs = {}
        for key in ("images", "caption_dir"):
            if key in entry:
                if not isinstance(entry[key], str):
                    raise ConfigError(f"{path}: concept {label}: {key!r} must be a folder path string")
                dirs[key] = path.parent / Path(entry[key]).expanduser()
        if dirs:
            ext = entry.get("caption_extension", ".txt")
            ext = ext if ext.startswith(".") else "." + ext
            try:
                images, folder_caps = _read_folder(entry["name"], dirs.get("images"), dirs.get("caption_dir"), ext)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            captions += folder_caps
        try:
            concepts.append(
                Concept(
                    name=entry["name"],
                    trigger=entry["trigger"],
                    class_word=entry.get("class_word", ""),
                    category=entry["category"],
                    train_captions=captions,
                    train_images=images,
                    subclass=entry.get("subclass", ""),
                    clip_rule=entry.get("clip_rule", ""),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    dupes = _duplicates([c.name for c in concepts])
    if dupes:
        raise ConfigError(f"{path}: duplicate concept name(s) {dupes} (each name is a folder of the evaluation)")
    return concepts


def _duplicates(names: list[str]) -> list[str]:
    """Names used twice, counting names that differ only in case (one folder on macOS and Windows)."""
    seen: dict[str, str] = {}
    dupes = []
    for name in names:
        key = name.casefold()
        if key in seen:
            dupes.append(name if seen[key] == name else f"{seen[key]}/{name}")
        seen.setdefault(key, name)
    return sorted(set(dupes))
