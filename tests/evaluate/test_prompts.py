"""Prompt sets of the evaluation framework: spread, seeds, templates, CLIP trigger processing, TOML."""

from __future__ import annotations

import pytest

from higanbana.errors import ConfigError
from higanbana.evaluate.prompts import (
    ALTER_TEMPLATES,
    CATEGORIES,
    DEFAULT_RULES,
    PROMPT_TYPES,
    RULES,
    STYLE_TEMPLATES,
    Concept,
    alter_diversity_warnings,
    build_all,
    build_prompt_set,
    clip_rule_for,
    concepts_from_toml,
    process_for_clip,
    prompts_for,
    spread,
)


def toy(**kw):
    base = dict(name="toy_bunny", trigger="sks", class_word="stuffed toy", category="object")
    return Concept(**{**base, **kw})


def person(**kw):
    base = dict(name="abukuma", trigger="whoo", class_word="anime girl", category="person")
    return Concept(**{**base, **kw})


def style(**kw):
    base = dict(name="ghibli", trigger="veli", class_word="style", category="style")
    return Concept(**{**base, **kw})


def scene(**kw):
    base = dict(name="castle", trigger="adl", class_word="scene", category="scene")
    return Concept(**{**base, **kw})


# --- spread -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [(100, 10, [10] * 10), (100, 3, [34, 33, 33]), (3, 10, [1, 1, 1]), (100, 1, [100]), (0, 5, []), (7, 7, [1] * 7)],
)
def test_spread(n, k, expected):
    assert spread(n, k) == expected
    assert sum(spread(n, k)) == n


def test_spread_errors():
    with pytest.raises(ConfigError, match="n_prompts"):
        spread(10, 0)
    with pytest.raises(ConfigError, match="n_images"):
        spread(-1, 3)


# --- templates --------------------------------------------------------------------------------


def test_template_counts_and_placeholders():
    assert set(ALTER_TEMPLATES) == set(CATEGORIES)
    all_alter = [t for ts in ALTER_TEMPLATES.values() for t in ts]
    assert len(all_alter) >= 30
    assert all(len(ts) >= 8 for ts in ALTER_TEMPLATES.values())
    assert len(STYLE_TEMPLATES) >= 5
    for t in all_alter + STYLE_TEMPLATES:
        assert t.count("{}") == 1, t
        assert t == t.strip() and "  " not in t
    assert len(set(all_alter)) == len(all_alter)
    assert len(set(STYLE_TEMPLATES)) == len(STYLE_TEMPLATES)


def test_style_category_templates_clean_after_dropping_descriptor():
    c = style()
    for prompt in prompts_for(c, "alter"):
        text = process_for_clip(prompt, c)
        assert "veli" not in text and "style" not in text
        assert text and not text.endswith(",") and not text.startswith(",")


# --- prompt lists and sets --------------------------------------------------------------------


def test_prompts_for_each_type():
    c = toy(train_captions=["sks stuffed toy, on a bed", " sks stuffed toy,  on a bed", "sks stuffed toy, grass", ""])
    assert prompts_for(c, "train") == ["sks stuffed toy, on a bed", "sks stuffed toy, grass"]
    assert prompts_for(c, "trigger") == ["sks stuffed toy"]
    assert prompts_for(c, "alter")[0] == ALTER_TEMPLATES["object"][0].replace("{}", "sks stuffed toy")
    assert prompts_for(c, "style") == [t.replace("{}", "sks stuffed toy") for t in STYLE_TEMPLATES]
    assert prompts_for(toy(class_word=""), "trigger") == ["sks"]
    assert prompts_for(c, "alter", alter_templates=["{} on a moon"]) == ["sks stuffed toy on a moon"]
    assert prompts_for(c, "alter", alter_templates={"object": ["{} in a box"]}) == ["sks stuffed toy in a box"]


def test_prompts_for_errors():
    c = toy()
    with pytest.raises(ConfigError, match="did you mean 'alter'"):
        prompts_for(c, "altr")
    with pytest.raises(ConfigError, match="exactly one"):
        prompts_for(c, "alter", alter_templates=["no placeholder"])
    with pytest.raises(ConfigError, match="exactly one"):
        prompts_for(c, "style", style_templates=["{} and {}"])
    with pytest.raises(ConfigError, match="category 'object'"):
        prompts_for(c, "alter", alter_templates={"person": ["{} x"]})


def test_build_prompt_set_counts_seeds_and_prompt_index():
    c = toy()
    items = build_prompt_set(c, "alter", alter_templates=[f"{{}} number {i}" for i in range(3)])
    assert len(items) == 100
    assert [it.seed for it in items] == list(range(1000, 1100))
    assert [it.index for it in items] == list(range(100))
    assert [it.prompt_index for it in items] == [0] * 34 + [1] * 33 + [2] * 33
    assert items[0].prompt == "sks stuffed toy number 0" and items[-1].prompt == "sks stuffed toy number 2"
    assert items[0].clip_text == "stuffed toy number 0"
    assert items[5].key == "toy_bunny/alter/5"
    assert len({it.key for it in items}) == 100

    trig = build_prompt_set(c, "trigger", n_images=7, seed_start=5)
    assert [it.seed for it in trig] == [5, 6, 7, 8, 9, 10, 11]
    assert {it.prompt for it in trig} == {"sks stuffed toy"} and {it.prompt_index for it in trig} == {0}

    alter = build_prompt_set(c, "alter")
    n = len(ALTER_TEMPLATES["object"])
    assert len(alter) == 100 and len({it.prompt for it in alter}) == n

    few = build_prompt_set(c, "alter", n_images=3)
    assert [it.prompt_index for it in few] == [0, 1, 2]


def test_style_type_empty_for_style_concepts():
    assert build_prompt_set(style(), "style") == []
    assert prompts_for(style(), "style") == []
    assert len(build_prompt_set(person(), "style")) == 100


def test_train_without_captions_is_an_error():
    with pytest.raises(ConfigError, match="toy_bunny.*captions"):
        build_prompt_set(toy(), "train")


def test_build_all_and_determinism():
    concepts = [toy(train_captions=["sks stuffed toy, a"]), style(train_captions=["veli style, b"])]
    a = build_all(concepts, n_images=10)
    b = build_all(concepts, n_images=10)
    assert a == b
    assert len(a) == 10 * 4 + 10 * 3  # no <style> for the style concept
    assert [(it.concept, it.prompt_type) for it in a[::10]] == [("toy_bunny", t) for t in PROMPT_TYPES] + [
        ("ghibli", t) for t in PROMPT_TYPES[:3]
    ]
    assert len({it.key for it in a}) == len(a)
    only = build_all(concepts, prompt_types=("trigger",), n_images=4)
    assert {it.prompt_type for it in only} == {"trigger"} and len(only) == 8
    with pytest.raises(ConfigError, match="duplicate"):
        build_all([toy(), toy()], prompt_types=("trigger",))
    with pytest.raises(ConfigError, match="did you mean 'style'"):
        build_all(concepts, prompt_types=("styl",))


# --- CLIP trigger processing ------------------------------------------------------------------


def test_default_rules():
    assert set(DEFAULT_RULES) == set(CATEGORIES) and set(DEFAULT_RULES.values()) <= set(RULES)
    assert clip_rule_for(person()) == "drop_trigger"
    assert clip_rule_for(toy()) == "replace_with_class" and clip_rule_for(scene()) == "replace_with_class"
    assert clip_rule_for(style()) == "drop_descriptor"
    assert clip_rule_for(person(), {"person": "keep"}) == "keep"
    assert clip_rule_for(person(clip_rule="drop_descriptor"), {"person": "keep"}) == "drop_descriptor"
    with pytest.raises(ConfigError, match="did you mean 'person'"):
        clip_rule_for(person(), {"persn": "keep"})
    with pytest.raises(ConfigError, match="did you mean 'keep'"):
        clip_rule_for(person(), {"person": "kep"})


def test_person_drops_trigger_keeps_class():
    c = person()
    assert process_for_clip("whoo anime girl, smile, full body", c) == "anime girl, smile, full body"
    assert process_for_clip("whoo anime girl in a lab coat", c) == "anime girl in a lab coat"
    assert process_for_clip("whoo, smile", person(class_word="")) == "smile"


def test_object_and_scene_replace_without_doubling():
    c = toy()
    assert process_for_clip("sks stuffed toy", c) == "stuffed toy"
    assert process_for_clip("sks stuffed toy on a beach", c) == "stuffed toy on a beach"
    assert process_for_clip("a photo of sks on a beach", c) == "a photo of stuffed toy on a beach"
    assert process_for_clip("stuffed toy sks, grass", c) == "stuffed toy, grass"
    assert process_for_clip("sks stuffed toy, sks, grass", c) == "stuffed toy, stuffed toy, grass"
    assert process_for_clip("adl scene at night", scene()) == "scene at night"
    assert process_for_clip("sks on a bed", toy(class_word="")) == "on a bed"


def test_style_drops_descriptor_and_cleans_commas():
    c = style()
    assert process_for_clip("a city skyline during sunset, veli style", c) == "a city skyline during sunset"
    assert process_for_clip("veli style, a cat, , veli, a dog", c) == "a cat, a dog"
    assert process_for_clip("of veli style , a harbour", c) == "a harbour"
    assert process_for_clip("veli style", c) == ""


def test_whole_word_case_sensitive_matching():
    c = toy()
    assert process_for_clip("sksa and tasks near sks", c) == "sksa and tasks near stuffed toy"
    assert process_for_clip("SKS stuffed toy", c) == "SKS stuffed toy"
    assert process_for_clip("tasks", person(trigger="sks")) == "tasks"
    odd = toy(trigger="s.k+s")  # regex characters are escaped
    assert process_for_clip("s.k+s stuffed toy, sxkks", odd) == "stuffed toy, sxkks"
    multi = person(trigger="dark uniform", class_word="outfit")
    assert process_for_clip("dark  uniform outfit, smile", multi) == "outfit, smile"


def test_rule_override_and_keep():
    c = toy()
    assert process_for_clip("sks stuffed toy  ,  grass", c, "keep") == "sks stuffed toy, grass"
    assert process_for_clip("sks stuffed toy, grass", c, "drop_descriptor") == "grass"
    assert process_for_clip("sks stuffed toy, grass", c, "drop_trigger") == "stuffed toy, grass"
    with pytest.raises(ConfigError, match="did you mean 'keep'"):
        process_for_clip("x", c, "kept")
    items = build_prompt_set(c, "trigger", n_images=2, clip_rules={"object": "keep"})
    assert items[0].clip_text == "sks stuffed toy"


def test_concept_validation():
    with pytest.raises(ConfigError, match="'category'.*did you mean 'person'"):
        toy(category="persn")
    with pytest.raises(ConfigError, match="trigger"):
        toy(trigger=" ")
    with pytest.raises(ConfigError, match="name"):
        toy(name="a/b")
    with pytest.raises(ConfigError, match="clip_rule"):
        toy(clip_rule="nope")
    assert toy().descriptor == "sks stuffed toy"


# --- TOML -------------------------------------------------------------------------------------


def test_concepts_from_toml_captions_and_folder(tmp_path):
    data = tmp_path / "data" / "bunny"
    data.mkdir(parents=True)
    for stem in ("b", "a"):
        (data / f"{stem}.png").write_bytes(b"")
        (data / f"{stem}.txt").write_text(f"sks stuffed toy, {stem}\n", encoding="utf-8")
    (data / "c.jpg").write_bytes(b"")  # no caption: still a training image
    (data / "notes.md").write_text("x")
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "a.caption").write_text("adl scene, from caps")
    cfg = tmp_path / "concepts.toml"
    cfg.write_text(
        """
[[concept]]
name = "ghibli"
trigger = "veli"
class_word = "style"
category = "style"
captions = ["veli style, a house", "veli style, a tree"]

[[concept]]
name = "toy_bunny"
trigger = "sks"
class_word = "stuffed toy"
category = "object"
subclass = "plushie"
images = "data/bunny"

[[concept]]
name = "castle"
trigger = "adl"
class_word = "scene"
category = "scene"
images = "data/bunny"
caption_dir = "caps"
caption_extension = "caption"
clip_rule = "keep"
""",
        encoding="utf-8",
    )
    ghibli, bunny, castle = concepts_from_toml(cfg)
    assert ghibli.train_captions == ["veli style, a house", "veli style, a tree"] and ghibli.train_images == []
    assert ghibli.subclass == "" and ghibli.category == "style"
    assert bunny.subclass == "plushie"
    assert [p.rsplit("/", 1)[-1] for p in bunny.train_images] == ["a.png", "b.png", "c.jpg"]
    assert bunny.train_captions == ["sks stuffed toy, a", "sks stuffed toy, b"]
    assert castle.train_captions == ["adl scene, from caps"] and castle.clip_rule == "keep"
    assert len(build_prompt_set(bunny, "train", n_images=4)) == 4


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('name = "x"\ntrigger = "sks"\ncategory = "object"\ncaptoins = []', "'x'.*'captoins'.*did you mean 'captions'"),
        ('name = "x"\ntrigger = "sks"', "'x'.*missing required key 'category'"),
        ('trigger = "sks"\ncategory = "object"', "#1.*missing required key 'name'"),
        ('name = "x"\ntrigger = "sks"\ncategory = "animal"', "'x'.*'category'"),
        ('name = "x"\ntrigger = "sks"\ncategory = "object"\nimages = "nowhere"', "'x'.*'images'.*does not exist"),
        ('name = "x"\ntrigger = "sks"\ncategory = "object"\nimages = "."', "'x'.*holds no images"),
        ('name = "x"\ntrigger = "sks"\ncategory = "object"\ncaptions = "one"', "'x'.*'captions' must be a list"),
        ('name = "x"\ntrigger = 3\ncategory = "object"', "'x'.*'trigger' must be a string"),
    ],
)
def test_concepts_from_toml_errors(tmp_path, body, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[[concept]]\n" + body + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        concepts_from_toml(cfg)


def test_concepts_from_toml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        concepts_from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[concepts]]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="did you mean 'concept'"):
        concepts_from_toml(bad)
    bad.write_text("[[concept]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        concepts_from_toml(bad)
    dup = tmp_path / "dup.toml"
    dup.write_text('[[concept]]\nname="x"\ntrigger="s"\ncategory="scene"\n' * 2)
    with pytest.raises(ConfigError, match="duplicate"):
        concepts_from_toml(dup)


def test_alter_diversity_warning_when_a_prompt_gets_one_image():
    templates = {"object": ["{}, red", "{}, blue", "{}, green"]}
    ok = build_all([toy()], ("alter", "trigger"), n_images=6, alter_templates=templates)
    assert alter_diversity_warnings(ok) == []  # 2 images per alter prompt
    thin = build_all([toy()], ("alter", "trigger"), n_images=4, alter_templates=templates)  # 2, 1, 1
    (warning,) = alter_diversity_warnings(thin)
    assert "'toy_bunny': 2 of 3 alter prompts get one image" in warning and "prompts.n_images" in warning
    assert alter_diversity_warnings(build_all([toy()], ("trigger",), n_images=1)) == []
