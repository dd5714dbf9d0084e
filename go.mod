module github.com/baton-run/baton

go 1.26.0

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/cilium/ebpf v0.22.0
	github.com/coreos/go-systemd/v22 v22.7.0
	golang.org/x/sys v0.49.0
)

require golang.org/x/sync v0.22.0 // indirect
