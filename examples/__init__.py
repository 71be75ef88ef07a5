"""Services built on rtcbus's subscribe API (:mod:`consumer.subscribe`), to read and to copy.

Not part of the wheel (it packages ``consumer`` only); run them from a checkout, e.g.
``python -m examples.presence``.
"""
