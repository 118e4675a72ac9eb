"""The 20 content categories of CONTRACT §6 and their prompt ensembles for
zero-shot CLIP categorization (scored by categorize.py with the same engine
as moderation: scoring.concept_logits). Each category is several phrasings of
what its videos show; the tag vocabulary lives in tags.py."""

from __future__ import annotations

from typing import Final

from ..schemas import CATEGORIZATION_NAMES


class Topic:
    __slots__ = ("name", "prompts")

    def __init__(self, name: str, prompts: tuple[str, ...]) -> None:
        self.name = name
        self.prompts = prompts


TOPICS: Final[tuple[Topic, ...]] = (
    Topic("Sports", (
        "a photo of a sports match in a stadium",
        "athletes competing in a sporting event",
        "a football or basketball game broadcast",
    )),
    Topic("Film & TV", (
        "a still from a movie",
        "a scene from a television drama series",
        "a cinematic film shot with actors",
    )),
    Topic("Music & Dance", (
        "a musician playing an instrument on stage",
        "people dancing to music",
        "a music video",
    )),
    Topic("Gaming", (
        "console gameplay of a video game",
        "a gamer streaming a computer game",
        "an esports tournament",
    )),
    Topic("Comedy & Memes", (
        "a funny meme with caption text",
        "a comedian performing stand-up comedy",
        "a humorous prank video",
    )),
    Topic("Lifestyle & Vlog", (
        "a vlogger filming their daily life",
        "a lifestyle vlog at home",
        "a person holding a selfie camera while walking",
    )),
    Topic("Travel & Nature", (
        "a travel video of a famous landmark",
        "a beautiful nature landscape with mountains",
        "tourists exploring a foreign city",
    )),
    Topic("Food & Cooking", (
        "a cooking tutorial with ingredients on a kitchen counter",
        "a delicious dish of food being served",
        "a chef preparing a recipe",
    )),
    Topic("Beauty & Fashion", (
        "a makeup tutorial",
        "a fashion runway show",
        "a person showing an outfit and accessories",
    )),
    Topic("Fitness & Health", (
        "a person doing a workout at the gym",
        "a yoga class",
        "a fitness trainer demonstrating exercises",
    )),
    Topic("Education & How-To", (
        "a teacher explaining a lesson on a whiteboard",
        "a step by step how-to tutorial",
        "an educational lecture with slides",
    )),
    Topic("Science & Technology", (
        "a review of a new smartphone or gadget",
        "a scientist working in a laboratory",
        "computer code and electronics",
    )),
    Topic("News & Politics", (
        "a news anchor reporting in a studio",
        "a politician giving a speech",
        "breaking news coverage",
    )),
    Topic("Business & Finance", (
        "stock market charts and financial data",
        "a business meeting in an office",
        "an entrepreneur presenting a startup pitch",
    )),
    Topic("Autos & Vehicles", (
        "a car review showing a new automobile",
        "a motorcycle or truck on the road",
        "racing cars speeding on a track",
    )),
    Topic("Pets & Animals", (
        "a cute pet dog or cat",
        "wild animals in their habitat",
        "a funny animal video with pets at home",
    )),
    Topic("Kids & Family", (
        "a cartoon for children",
        "parents playing with their toddler",
        "toys being unboxed for children",
    )),
    Topic("Art & DIY", (
        "an artist painting a picture",
        "a handmade craft project",
        "a do it yourself woodworking project",
    )),
    Topic("Talk & Podcasts", (
        "two people talking into microphones on a podcast",
        "a talk show interview",
        "a panel discussion",
    )),
    Topic("Home & Garden", (
        "a home renovation and interior design",
        "gardening with plants and flowers",
        "a tour of a cozy house",
    )),
)

assert tuple(t.name for t in TOPICS) == CATEGORIZATION_NAMES, "categorization categories differ from schemas.py"
