package setup

import (
	"os"
	"os/user"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// currentUser names the real uid now (user.Current caches its first answer, from before
// --runas).
func currentUser() string {
	if u, err := user.LookupId(strconv.Itoa(os.Getuid())); err == nil {
		return u.Username
	}
	return strconv.Itoa(os.Getuid())
}

// currentUserGroup is user:group of the real ids, for the log.
func currentUserGroup() string {
	g := strconv.Itoa(os.Getgid())
	if gr, err := user.LookupGroupId(g); err == nil {
		g = gr.Name
	}
	return currentUser() + ":" + g
}

// accessRW checks that the process may create files in dir: access(2) R_OK|W_OK|X_OK with
// the real uid, as the C tools check permissions.
func accessRW(dir string) error {
	return unix.Access(dir, unix.R_OK|unix.W_OK|unix.X_OK)
}

// logTime is swtpm_setup's timestamp (strftime "%a %d %h %Y %I:%M:%S %p %Z").
func logTime() string { return time.Now().Format("Mon 02 Jan 2006 03:04:05 PM MST") }
