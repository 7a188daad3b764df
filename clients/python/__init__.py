"""The Python WebRTC client of the avatar server (``avatar client``)."""
