"""geneve-dp: a userspace GENEVE (RFC 8926) dataplane for Istio ambient's node redirection."""

__version__ = "0.1.0"
