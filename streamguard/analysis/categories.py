"""The 13 moderation categories of the reference API, their severities, and the
prompt ensembles used for zero-shot CLIP scoring.

Each category has several phrasings (an ensemble: CLIP's zero-shot accuracy
improves when the text embeddings of several prompts are averaged, as in the
CLIP paper's ImageNet prompt ensembling). SAFE_PROMPTS is the contrast set:
ordinary scenes a live stream mostly shows. A category's score is how strongly
a frame prefers that category over the best-matching safe scene (see
scoring.py), so the safe set must cover everyday content broadly.
"""

from __future__ import annotations

from typing import Final, Literal

Severity = Literal["low", "medium", "high", "critical"]


class Category:
    __slots__ = ("name", "severity", "prompts")

    def __init__(self, name: str, severity: Severity, prompts: tuple[str, ...]) -> None:
        self.name = name
        self.severity = severity
        self.prompts = prompts


MODERATION_CATEGORIES: Final[tuple[Category, ...]] = (
    Category("nudity_explicit", "critical", (
        "a photo of a fully naked person with exposed genitals",
        "explicit full frontal nudity",
        "a hardcore pornographic image",
    )),
    Category("sexual_activity", "critical", (
        "a photo of people having sexual intercourse",
        "an explicit sex act",
        "a pornographic video still of people having sex",
    )),
    Category("suggestive_nudity", "high", (
        "a photo of a topless person",
        "a photo showing exposed buttocks",
        "implied nudity photographed from behind",
    )),
    Category("lingerie_underwear", "medium", (
        "a photo of a person wearing lingerie",
        "a person in a bra and panties",
        "a boudoir photo shoot in revealing underwear",
    )),
    Category("sexy_suggestive", "low", (
        "a person posing seductively",
        "sensual dancing in tight revealing clothing",
        "a sexy suggestive photo",
    )),
    Category("violence", "high", (
        "a photo of people fighting violently",
        "a physical assault with someone being beaten",
        "armed conflict and war footage",
    )),
    Category("gore_graphic", "critical", (
        "a graphic photo of bloody gore and mutilation",
        "a photo of a dead body",
        "extremely graphic violence with blood and wounds",
    )),
    Category("hate_symbols", "critical", (
        "a photo of a swastika or other hate group symbol",
        "racist hate propaganda",
        "a white supremacist flag or emblem",
    )),
    Category("drugs_substances", "medium", (
        "a photo of illegal drugs and drug paraphernalia",
        "a person snorting cocaine or injecting drugs",
        "a person smoking a crack pipe",
    )),
    Category("weapons", "medium", (
        "a photo of a gun",
        "a person holding a firearm or rifle",
        "a knife or explosives displayed prominently",
    )),
    Category("child_safety", "critical", (
        "a photo of a child in danger",
        "a child being exploited or abused",
        "a minor in an unsafe sexualized situation",
    )),
    Category("self_harm", "critical", (
        "a photo of self-harm with cuts on a wrist",
        "a person attempting suicide",
        "pro-anorexia imagery of an emaciated body",
    )),
    Category("harassment", "medium", (
        "a photo of a person being bullied",
        "someone threatening and intimidating another person",
        "a person being harassed by a group",
    )),
)

SAFE_PROMPTS: Final[tuple[str, ...]] = (
    "a photo of people talking",
    "a person speaking to the camera",
    "a photo of a landscape",
    "a city street",
    "a photo of food",
    "a video game screenshot",
    "a screen with text and graphics",
    "a sports game",
    "a photo of an animal",
    "an empty room",
    "a concert on stage",
    "a colorful abstract pattern",
    "a plain background",
    "a television news studio",
    "people dressed casually",
)

CATEGORY_NAMES: Final[tuple[str, ...]] = tuple(c.name for c in MODERATION_CATEGORIES)
SEVERITY: Final[dict[str, Severity]] = {c.name: c.severity for c in MODERATION_CATEGORIES}
