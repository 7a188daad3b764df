"""The WebRTC server (``avatar serve``): aiohttp signalling and APIs (``app``), one session per peer
(``session``), the pipeline's frames as aiortc tracks on one media clock (``tracks``), the avatar
store (``avatars``)."""
