"""Errors that bad input raises: one class per cause, each with a message that names the file.

Every error a user can cause derives from :class:`AvatarInputError`, so that front ends
(the CLI, the server) can answer it as "your input is wrong" rather than as a crash.
"""
from __future__ import annotations


class AvatarInputError(Exception):
    """Base class: the input (a file, an image, an argument) cannot be used as given."""


class UnreadableMediaError(AvatarInputError):
    """The file is missing, not a media container, or truncated beyond decoding."""


class NoAudioStreamError(AvatarInputError):
    """The container has no audio stream."""


class NoVideoStreamError(AvatarInputError):
    """The container has no video stream."""


class EmptyAudioError(AvatarInputError):
    """The audio stream decodes to zero samples."""


class NoFaceError(AvatarInputError):
    """No face was found in the image or frame."""


class MultipleFacesError(AvatarInputError):
    """Several faces were found and the caller asked to refuse rather than pick the largest."""


class FaceTooSmallError(AvatarInputError):
    """The face is smaller than the configured minimum size in pixels."""


class ImageTooLargeError(AvatarInputError):
    """The image exceeds the configured maximum number of pixels."""


class BundleError(AvatarInputError):
    """A model bundle is missing a file, has a file whose sha256 does not match, or is malformed."""
