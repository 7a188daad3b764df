"""The avatar in a pipecat-ai pipeline (optional extra ``[pipecat]``).

``AvatarVideoProcessor`` goes where a pipecat avatar service goes, after the TTS service and
before the output transport::

    Pipeline([transport.input(), stt, user_agg, llm, tts, AvatarVideoProcessor(runtime, avatar),
              transport.output(), assistant_agg])

It is a thin translation onto the engine's own API (``engine.pipeline``): TTS audio frames are
pushed into a ``PushSource``, TTS stopped frames end the segment, interruptions clear the
buffer, and the pipeline's output frames go downstream as image frames with their audio. pipecat
is imported only in this package; the engine never imports it.
"""
from clients.pipecat.processor import AvatarVideoProcessor

__all__ = ["AvatarVideoProcessor"]
