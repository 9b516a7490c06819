"""Notifications: users subscribe to experiments or instruments they may see and hear when a run finishes.

Subscriptions and the outcome of each channel's last delivery live on ``topics.NOTIFICATIONS`` (compacted,
folded with :class:`~runner.bus.table.TopicTable`); ``nbreduce notify`` consumes the status topic as a
consumer group (:class:`~runner.bus.work.WorkConsumer`) and sends e-mails and webhooks.
"""
