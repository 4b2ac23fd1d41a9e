"""What travels between the API and the subscriber: the message codec, the decoded envelope, the dead-letter store."""
