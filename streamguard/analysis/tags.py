"""The tag vocabulary of categorization (CONTRACT §6): short phrases, grouped
by the category they most belong to. A result's `tags` are the phrases that
best match its analysed frames (categorize.py), from any category. Each tag
is encoded through TAG_TEMPLATE, as the CLIP paper prompts its class names."""

from __future__ import annotations

from typing import Final

from .taxonomy import TOPICS

TAG_TEMPLATE: Final[str] = "a photo of {}"

TAGS_BY_CATEGORY: Final[dict[str, tuple[str, ...]]] = {
    "Sports": (
        "football", "soccer", "basketball", "tennis", "baseball", "stadium", "athletes running",
        "crowd cheering", "goalkeeper", "referee", "race track", "cycling race", "golf course", "ice hockey",
        "volleyball", "swimming race", "skiing", "surfing", "skateboarding", "scoreboard",
    ),
    "Film & TV": (
        "movie scene", "film set", "actors", "movie trailer", "tv series", "sitcom", "cinema screen",
        "red carpet", "behind the scenes", "opening credits", "horror movie", "drama scene", "sci-fi scene",
        "animated film",
    ),
    "Music & Dance": (
        "concert stage", "guitarist", "drummer", "singer", "piano", "orchestra", "dj booth", "dance crew",
        "ballet", "hip hop dance", "music festival", "choir", "violin", "recording studio",
    ),
    "Gaming": (
        "video game", "first person shooter", "gaming setup", "game controller", "esports arena",
        "minecraft", "racing game", "streamer face cam", "pixel art game", "strategy game", "game menu",
        "virtual reality headset",
    ),
    "Comedy & Memes": (
        "meme", "stand-up comedy", "prank", "funny face", "sketch comedy", "impact font caption",
        "reaction video", "parody", "clown", "laughing audience",
    ),
    "Lifestyle & Vlog": (
        "vlog", "morning routine", "selfie", "day in my life", "coffee shop", "apartment tour", "shopping haul",
        "unboxing", "road trip", "friends hanging out", "room makeover",
    ),
    "Travel & Nature": (
        "beach", "mountains", "waterfall", "forest", "sunset", "desert", "landmark", "tourists", "hiking trail",
        "lake", "snowy peaks", "city skyline", "island", "camping tent", "hot air balloon",
    ),
    "Food & Cooking": (
        "cooking", "recipe", "chef", "kitchen", "baking", "pizza", "burger", "sushi", "dessert", "salad",
        "barbecue grill", "restaurant", "street food", "coffee", "cake decorating", "chopping vegetables",
    ),
    "Beauty & Fashion": (
        "makeup", "lipstick", "hairstyle", "nail art", "skincare", "runway", "fashion model", "outfit",
        "sneakers", "jewelry", "handbag", "dress", "haircut", "perfume",
    ),
    "Fitness & Health": (
        "workout", "gym", "weightlifting", "yoga", "running", "stretching", "pilates", "push-ups", "treadmill",
        "healthy meal", "meditation", "personal trainer", "crossfit",
    ),
    "Education & How-To": (
        "tutorial", "whiteboard", "classroom", "lecture", "diagram", "math equations", "language lesson",
        "step by step guide", "chalkboard", "textbook", "online course", "slides presentation",
    ),
    "Science & Technology": (
        "smartphone", "laptop", "circuit board", "robot", "laboratory", "microscope", "rocket launch",
        "space", "coding", "gadget review", "drone", "3d printer", "solar panels", "data center",
    ),
    "News & Politics": (
        "news anchor", "press conference", "politician", "parliament", "election", "protest", "interview",
        "breaking news", "news ticker", "reporter", "podium speech", "flag",
    ),
    "Business & Finance": (
        "stock chart", "office meeting", "presentation", "cryptocurrency", "money", "startup pitch",
        "spreadsheet", "handshake", "real estate", "bank", "trading screen", "conference room",
    ),
    "Autos & Vehicles": (
        "car", "sports car", "motorcycle", "truck", "car interior", "engine", "racing", "electric car",
        "traffic", "car wash", "off-road vehicle", "bicycle", "airplane", "train",
    ),
    "Pets & Animals": (
        "dog", "cat", "puppy", "kitten", "horse", "bird", "fish tank", "wildlife", "zoo", "farm animals",
        "hamster", "lion", "elephant", "dog training",
    ),
    "Kids & Family": (
        "kids", "toddler", "baby", "toys", "playground", "family", "cartoon", "birthday party", "nursery rhyme",
        "lego", "board game", "school", "family dinner",
    ),
    "Art & DIY": (
        "painting", "drawing", "sculpture", "crafts", "knitting", "woodworking", "pottery", "sketchbook",
        "calligraphy", "origami", "sewing", "diy project", "street art", "digital art",
    ),
    "Talk & Podcasts": (
        "podcast", "microphone", "talk show", "panel discussion", "two people talking", "headphones",
        "studio interview", "debate", "talking head", "radio show",
    ),
    "Home & Garden": (
        "garden", "flowers", "houseplants", "living room", "interior design", "renovation", "furniture",
        "backyard", "lawn mowing", "bedroom", "home decor", "vegetable garden", "cleaning", "power tools",
    ),
}

assert tuple(TAGS_BY_CATEGORY) == tuple(t.name for t in TOPICS), "tags are grouped by the 20 categories"

# Every tag once, in category order (a tag listed under two categories counts once).
TAGS: Final[tuple[str, ...]] = tuple(dict.fromkeys(t for tags in TAGS_BY_CATEGORY.values() for t in tags))
