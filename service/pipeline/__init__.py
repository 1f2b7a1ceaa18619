"""The Kafka side of a swap: the consume loop, the open partitions, each swap's job, the commits."""
