"""What the replicas of the service share through Kafka: the access token and its holder (one
replica logs in and refreshes, fenced by a transactional producer, and publishes the token
encrypted on a compacted topic), and the budget exchange (each replica's recent calls, so a
replica gaining partitions starts from the application's real window).

It sits between the pipeline and :mod:`service.platform`: it uses the platform's token manager
and rate budget, and Kafka (aiokafka, :mod:`service.kafka`); :mod:`service.platform` imports
nothing from here, nor from Kafka (the import-linter contracts in pyproject.toml).
"""
