"""FLUX.1 Kontext [dev] image editing with TaylorSeer step caching."""

import logging

# diffusers' Kontext pipeline and IP-adapter loader import transformers' CLIPImageProcessor and
# SiglipImageProcessor, which in transformers 5 need torchvision; without it transformers binds the PIL classes
# instead and says so once per process. Nothing here uses those two names (the safety checker loads the PIL
# classes itself: flux/safety.py), so that notice is noise on every setup. Only it is dropped.
_UNUSED_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


def _not_the_unused_processors_notice(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (
        "requires torchvision (not installed); falling back to" in message
        and any(message.startswith(f"`{name}` ") for name in _UNUSED_PROCESSORS)
    )


logging.getLogger("transformers.utils.import_utils").addFilter(_not_the_unused_processors_notice)
