"""Step 2 of the flow, the broker: Kafka clients, the topics and their retention, the wire models,
the consumption layer (work consumer, topic tables), heartbeats, and the embedded broker."""
