package cli

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is what `baton --version` and `restart --version` print: the
// program, the module version it was built as (a release tag, or
// "(devel)" for a build from a checkout), the commit and whether the
// checkout had changes, and the Go toolchain and platform.
func Version(prog string) string {
	version, rev := "(unknown)", ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		version = bi.Main.Version
		var commit, modified string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					modified = "+changes"
				}
			}
		}
		if len(commit) > 12 {
			commit = commit[:12]
		}
		if commit != "" {
			rev = fmt.Sprintf(" commit %s%s", commit, modified)
		}
	}
	return fmt.Sprintf("%s %s%s %s %s/%s", prog, version, rev, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
