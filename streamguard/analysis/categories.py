"""The 13 moderation categories of the reference API, their severities, and the
prompt ensembles used for zero-shot CLIP scoring.

Each category has several phrasings (an ensemble: CLIP's zero-shot accuracy
improves when the text embeddings of several prompts are averaged, as in the
CLIP paper's ImageNet prompt ensembling). SAFE_CONCEPTS is the contrast set:
ordinary scenes a live stream mostly shows, each an ensemble too. A category's
score is how strongly a frame prefers that category over the everyday scenes
(see scoring.py), so the safe set must cover everyday content broadly, and
above all the everyday scenes CLIP confuses with a category.
"""

from __future__ import annotations

from typing import Final, Literal

from ..schemas import MODERATION_CATEGORY_NAMES

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

class Concept:
    """A contrast concept: an everyday scene, several phrasings of it."""

    __slots__ = ("name", "prompts")

    def __init__(self, name: str, prompts: tuple[str, ...]) -> None:
        self.name = name
        self.prompts = prompts


# The contrast set: everyday scenes a stream mostly shows, each an ensemble
# scored exactly like a category (scoring.py). Besides the generic scenes it
# names what CLIP is known to confuse with a category, so such a frame has a
# better explanation than the category: children playing (child_safety),
# swimwear at the beach (nudity, lingerie, suggestive), cooking with kitchen
# knives (weapons), combat sports (violence), surgery and medical teaching
# (gore, self-harm), video games, cartoons and news footage (violence,
# weapons, hate symbols), protests and crowds (harassment, violence).
SAFE_CONCEPTS: Final[tuple[Concept, ...]] = (
    Concept("people talking", ("a photo of people having a conversation", "a group of friends chatting")),
    Concept("person speaking to camera", ("a person speaking to the camera", "a vlogger talking into a webcam")),
    Concept("landscape", ("a photo of a quiet countryside landscape", "a scenic view of mountains and sky")),
    Concept("city street", ("a busy city street with shops", "pedestrians walking on a sidewalk downtown")),
    Concept("food", ("a photo of food on a plate", "a plate of food on a table")),
    Concept("cooking with kitchen knives", ("a cook slicing vegetables on a cutting board with a kitchen knife",
                                            "home cooking at a kitchen stove")),
    Concept("video game", ("a video game screenshot", "a screenshot of gameplay in a computer game")),
    Concept("cartoon", ("a cartoon with drawn characters", "an animated cartoon with talking animal characters")),
    Concept("screen with text", ("a screen with text and graphics", "a slide presentation")),
    Concept("sports game", ("a televised sports game", "players on a field during a match")),
    Concept("combat sports", ("a boxing match in a ring", "a martial arts competition with referees")),
    Concept("swimwear at the beach", ("people in swimsuits at the beach", "swimmers at a swimming pool")),
    Concept("children playing", ("children playing in a park", "kids laughing on a playground slide")),
    Concept("family at home", ("a family relaxing at home", "parents and kids relaxing on a sofa")),
    Concept("surgery and medical teaching", ("surgeons operating in a hospital",
                                             "a doctor explaining anatomy in a medical lecture")),
    Concept("news footage", ("a television newsroom studio set", "news footage with a reporter on location")),
    Concept("protest or crowd", ("a peaceful crowd at a public event", "people marching at a rally")),
    Concept("animal", ("a photo of an animal outdoors", "a pet dog or cat resting indoors")),
    Concept("empty room", ("an empty room", "an empty office with desks")),
    Concept("concert", ("concertgoers in front of a stage", "musicians performing live")),
    Concept("abstract pattern", ("a colorful abstract pattern", "a test pattern with color bars")),
    Concept("plain background", ("a plain background", "a blank screen")),
    Concept("casual clothes", ("people dressed casually", "a fashion model in everyday clothes")),
    Concept("gym workout", ("people exercising at a gym", "an outdoor fitness workout")),
    Concept("museum art", ("a classical painting or statue in a museum", "an art gallery")),
    Concept("vehicles and traffic", ("cars driving on a road", "a car on display")),
)
SAFE_PROMPTS: Final[tuple[str, ...]] = tuple(p for c in SAFE_CONCEPTS for p in c.prompts)

CATEGORY_NAMES: Final[tuple[str, ...]] = tuple(c.name for c in MODERATION_CATEGORIES)
SEVERITY: Final[dict[str, Severity]] = {c.name: c.severity for c in MODERATION_CATEGORIES}
# The wire names (schemas.py) and these categories are one list.
assert CATEGORY_NAMES == MODERATION_CATEGORY_NAMES, "moderation categories differ from schemas.py"
