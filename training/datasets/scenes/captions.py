"""Caption templates: the seen splits' and test-novel's, and the choice of 5 true captions per scene."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from training.data import CAPTIONS_PER_IMAGE
from training.datasets.scenes.english import NUMBER_WORDS
from training.datasets.scenes.inventory import Background, ScenesError, Stamp
from training.datasets.scenes.layout import Box, Placement, Scene
from training.datasets.scenes.relations import (
    above,
    bigger,
    horizontal_half,
    left_of,
    next_to,
    size_class,
    vertical_half,
)

@dataclass(frozen=True)


class Caption:
    """A caption, the template that made it and the object phrases it mentions."""

    template: str
    text: str
    mentions: tuple[str, ...]


# Size adjectives by size class: the seen splits' and test-novel's.
SEEN_SIZE_WORDS = {"large": "large", "small": "small"}
NOVEL_SIZE_WORDS = {"large": "big", "small": "tiny"}


def size_word(placement: Placement, size: int, words: dict[str, str]) -> str | None:
    """The adjective ``words`` give the object's size class, unless its phrase states a size already
    ("very small pitcher") or it is between the classes."""
    return None if placement.stamp.has_size_word else words.get(size_class(placement.box, size) or "")


def noun_group(stamp: Stamp, count: int, adjective: str | None = None) -> str:
    """"a duck", "an owl", "a small duck", "two small ducks"."""
    if count == 1:
        return f"a {adjective} {stamp.phrase}" if adjective else f"{stamp.article} {stamp.phrase}"
    return " ".join(filter(None, (NUMBER_WORDS[count], adjective, stamp.plural)))


def join_words(items: Sequence[str]) -> str:
    """"a duck", "a duck and an owl", "a duck, an owl and two pumpkins"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


@dataclass(frozen=True)


class View:
    """A scene as templates see it: objects left to right, the image side and the background."""

    objects: tuple[Placement, ...]
    size: int
    background: Background

    @classmethod
    def of(cls, scene: Scene, size: int) -> View:
        """The view of a scene drawn ``size`` pixels square."""
        ordered = sorted(scene.placements, key=lambda p: (p.box[0], p.box[1]))
        return cls(tuple(ordered), size, scene.background)

    def groups(self, words: dict[str, str] | None = None) -> list[tuple[Stamp, int, str | None]]:
        """``(stamp, count, adjective)`` for each different phrase (and, given size ``words``, size
        adjective), in order of first appearance from the left."""
        counts: dict[tuple[str, str | None], int] = {}
        stamps: dict[str, Stamp] = {}
        for placement in self.objects:
            key = (placement.stamp.phrase, size_word(placement, self.size, words) if words else None)
            counts[key] = counts.get(key, 0) + 1
            stamps.setdefault(placement.stamp.phrase, placement.stamp)
        return [(stamps[phrase], count, adjective) for (phrase, adjective), count in counts.items()]

    def things(self, words: dict[str, str] | None = None) -> str:
        """All the objects: "a duck, two pumpkins and a green bus" (with ``words``: "a small duck, ...")."""
        return join_words([noun_group(stamp, count, adjective) for stamp, count, adjective in self.groups(words)])

    def phrases(self) -> tuple[str, ...]:
        """Each different object phrase once, from the left."""
        return tuple(stamp.phrase for stamp, _, _ in self.groups())


Template = Callable[[View], Iterator[Caption]]


def scene_template(name: str, form: Callable[[View, str], str]) -> Template:
    """A caption about the whole scene: ``form(view, things)``; mentions every object."""
    def captions(view: View) -> Iterator[Caption]:
        yield Caption(name, form(view, view.things()), view.phrases())
    return captions


def sized_scene_template(name: str, words: dict[str, str]) -> Template:
    """All the objects with their size adjectives ("a large duck and two small pumpkins"), if any has one."""
    def captions(view: View) -> Iterator[Caption]:
        if any(size_word(placement, view.size, words) for placement in view.objects):
            yield Caption(name, view.things(words), view.phrases())
    return captions


def pair_template(name: str, holds: Callable[[Box, Box, int], bool], form: str) -> Template:
    """``form.format(a=..., b=...)`` for every two objects of different phrases where ``holds``."""
    def captions(view: View) -> Iterator[Caption]:
        for a in view.objects:
            for b in view.objects:
                if a.stamp.phrase != b.stamp.phrase and holds(a.box, b.box, view.size):
                    text = form.format(a=noun_group(a.stamp, 1), b=noun_group(b.stamp, 1))
                    yield Caption(name, text, (a.stamp.phrase, b.stamp.phrase))
    return captions


def place_template(name: str, half: Callable[[Box, int], str | None], form: str, words: dict[str, str]
                   ) -> Template:
    """``form.format(thing=..., half=...)`` for every object wholly in one half of the picture, with
    its size adjective: "a small duck on the left side of the picture"."""
    def captions(view: View) -> Iterator[Caption]:
        for placement in view.objects:
            where = half(placement.box, view.size)
            if where is not None:
                thing = noun_group(placement.stamp, 1, size_word(placement, view.size, words))
                yield Caption(name, form.format(thing=thing, half=where), (placement.stamp.phrase,))
    return captions


def group_template(name: str, describe: Callable[[Stamp, int], str | None]) -> Template:
    """``describe(stamp, count)`` for every different phrase it has something true to say about."""
    def captions(view: View) -> Iterator[Caption]:
        for stamp, count, _ in view.groups():
            text = describe(stamp, count)
            if text is not None:
                yield Caption(name, text, (stamp.phrase,))
    return captions


def _objects(count: int) -> str:
    return f"{NUMBER_WORDS[count]} object{'s' if count > 1 else ''}"


def _is_are(view: View) -> str:
    return "is" if view.groups()[0][1] == 1 else "are"


def _group_of(stamp: Stamp, count: int) -> str | None:
    if count < 2:
        return None
    return f"a pair of {stamp.plural}" if count == 2 else f"a group of {NUMBER_WORDS[count]} {stamp.plural}"


SEEN_TEMPLATES: dict[str, Template] = {
    "list": scene_template("list", lambda view, things: things),
    "photo-of": scene_template("photo-of", lambda view, things: f"a photo of {things}"),
    "scene-with": scene_template("scene-with", lambda view, things: f"a scene with {things}"),
    "on-background": scene_template("on-background", lambda view, things: f"{things} {view.background.on_phrase}"),
    "object-count": scene_template("object-count", lambda view, things: f"{_objects(len(view.objects))}: {things}"),
    "sizes": sized_scene_template("sizes", SEEN_SIZE_WORDS),
    "left-of": pair_template("left-of", left_of, "{a} to the left of {b}"),
    "above": pair_template("above", above, "{a} above {b}"),
    "picture-side": place_template("picture-side", horizontal_half, "{thing} on the {half} side of the picture",
                                   SEEN_SIZE_WORDS),
    "count": group_template("count", lambda stamp, n: f"{NUMBER_WORDS[n]} {stamp.plural}" if n > 1 else None),
}
NOVEL_TEMPLATES: dict[str, Template] = {
    "there-is": scene_template("there-is", lambda view, things: f"there {_is_are(view)} {things}"),
    "picture-with": scene_template("picture-with", lambda view, things: f"a picture with {things}"),
    "you-can-see": scene_template("you-can-see", lambda view, things: f"you can see {things}"),
    "behind": scene_template("behind", lambda view, things: f"{view.background.noun} behind {things}"),
    "in-total": scene_template("in-total", lambda view, things: f"{things}, {_objects(len(view.objects))} in total"),
    "big-tiny": sized_scene_template("big-tiny", NOVEL_SIZE_WORDS),
    "right-of": pair_template("right-of", lambda a, b, size: left_of(b, a, size), "{a} to the right of {b}"),
    "below": pair_template("below", lambda a, b, size: above(b, a, size), "{a} below {b}"),
    "next-to": pair_template("next-to", next_to, "{a} next to {b}"),
    "bigger-than": pair_template("bigger-than", bigger, "{a} that is bigger than {b}"),
    "top-bottom": place_template("top-bottom", vertical_half, "{thing} at the {half} of the picture",
                                 NOVEL_SIZE_WORDS),
    "group-of": group_template("group-of", _group_of),
}


def templates_for(split: str) -> dict[str, Template]:
    """test-novel's templates for test-novel, the seen ones for every other split."""
    return NOVEL_TEMPLATES if split == "test-novel" else SEEN_TEMPLATES


def caption_candidates(view: View, templates: dict[str, Template]) -> list[Caption]:
    """Every caption the templates make for the scene, without duplicate texts, in a fixed order."""
    unique: dict[str, Caption] = {}
    for template in templates.values():
        for caption in template(view):
            unique.setdefault(caption.text, caption)
    return list(unique.values())


def choose_captions(rng: np.random.Generator, candidates: Sequence[Caption], phrases: Sequence[str],
                    count: int = CAPTIONS_PER_IMAGE) -> list[Caption]:
    """``count`` different captions that together mention every phrase, favouring unused templates."""
    if len(candidates) < count:
        raise ScenesError(f"only {len(candidates)} different captions for a scene of {list(phrases)}")
    chosen: list[Caption] = []
    while len(chosen) < count:
        covered = {phrase for caption in chosen for phrase in caption.mentions}
        used = {caption.template for caption in chosen}
        options = [caption for caption in candidates if caption not in chosen]
        options = [c for c in options if any(p not in covered for p in c.mentions)] or options
        options = [c for c in options if c.template not in used] or options
        chosen.append(options[int(rng.integers(len(options)))])
    return [chosen[int(i)] for i in rng.permutation(count)]


def describe(rng: np.random.Generator, scene: Scene, size: int, split: str) -> list[Caption]:
    """The 5 captions of a scene of ``split``."""
    view = View.of(scene, size)
    return choose_captions(rng, caption_candidates(view, templates_for(split)), view.phrases())
