"""The OpenNebula contract: version, inputs, outputs, XML, oned API."""
