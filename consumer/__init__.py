"""rtcbus: RTC cloud callbacks as a typed, exactly-once event bus on Apache Kafka."""

__version__ = "0.1.0"
